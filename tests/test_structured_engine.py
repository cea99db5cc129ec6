"""Structured outputs in the offline engine (CPU): the JSON Schema suite (tests/data/json_schemas.json)
through the bundled demo model and a tiny random one, regex / choice / grammars, and grammars together
with n > 1, seeds, logprobs, stop strings, min_tokens, overlapped decoding and a padded vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import llguidance
import numpy as np
import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.errors import InvalidRequestError
from fenwick_llm.engine.grammar import GrammarError, lark_of
from fenwick_llm.engine.structured_output import GRAMMAR_ERROR
from fenwick_llm.engine.structured_params import StructuredOutputsParams
from fenwick_llm.models import demo_model_dir
from jsonschema import Draft202012Validator
from tiny import make_tiny_model

SCHEMAS: dict[str, dict] = json.loads((Path(__file__).parent / "data" / "json_schemas.json").read_text())
PROMPT = "<|user|>\nAnswer in JSON.<|endoftext|>\n<|assistant|>\n"
MAX_TOKENS = 400  # every schema of the suite is bounded well below this (strings, arrays, numbers' ranges)


def valid(schema: dict, text: str) -> bool:
    try:
        value = json.loads(text)
    except ValueError:
        return False
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).is_valid(value)


def so(**kw: object) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), max_num_seqs=64, max_model_len=512)


@pytest.fixture(scope="module")
def demo() -> LLM:
    return LLM(str(demo_model_dir()), max_num_seqs=64, max_model_len=512)


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_every_schema_of_the_suite_parses_and_validates(which: str, request: pytest.FixtureRequest) -> None:
    """All 62 schemas in one batch, sampled at temperature 1 (seeded): each output is complete JSON that
    validates against its schema (formats checked) and ends with "stop", never at max_tokens."""
    llm: LLM = request.getfixturevalue(which)
    names = list(SCHEMAS)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=MAX_TOKENS,
                             structured_outputs=so(json=SCHEMAS[n])) for i, n in enumerate(names)]
    outs = llm.generate([PROMPT] * len(names), params)
    bad = [(n, o.outputs[0].finish_reason, o.outputs[0].text) for n, o in zip(names, outs, strict=True)
           if o.outputs[0].finish_reason != "stop" or not valid(SCHEMAS[n], o.outputs[0].text)]
    assert not bad, bad


def test_greedy_is_the_argmax_over_the_allowed_tokens(tiny: LLM) -> None:
    """Temperature 0 under a grammar: each token is the argmax of the raw logits among the tokens the
    grammar allows at that point (replayed with a fresh llguidance matcher and one full forward)."""
    spec = so(json=SCHEMAS["weather_report"])
    out = tiny.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                               structured_outputs=spec))[0]
    ids = out.prompt_token_ids + out.outputs[0].token_ids
    with torch.no_grad():
        logits = tiny.engine.model(torch.tensor([ids]))[0, len(out.prompt_token_ids) - 1:-1].float()
    grammars = tiny.engine.grammars
    assert grammars is not None
    m = grammars.get(spec)[0].matcher()
    row = np.zeros((grammars.vocab_size + 31) // 32, dtype=np.int32)
    for pos, token in enumerate(out.outputs[0].token_ids):
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        allowed = np.unpackbits(row.view(np.uint8), bitorder="little")[:grammars.vocab_size].astype(bool)
        masked = logits[pos].masked_fill(~torch.from_numpy(allowed), float("-inf"))
        assert int(masked.argmax()) == token, pos
        assert m.consume_token(token)
    assert m.is_stopped() and valid(SCHEMAS["weather_report"], out.outputs[0].text)


@pytest.mark.parametrize("spec,check", [
    (dict(regex=r"[A-Z]{3}-[0-9]{2,4}"), lambda t: re.fullmatch(r"[A-Z]{3}-[0-9]{2,4}", t)),
    (dict(choice=["yes", "no", "it depends"]), lambda t: t in ("yes", "no", "it depends")),
    (dict(grammar='start: "(" NUM (" + " NUM)* ")"\nNUM: /[1-9][0-9]?/'),
     lambda t: re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?)*\)", t)),
    (dict(grammar='root ::= "say " word\nword ::= "hi" | "bye"'), lambda t: t in ("say hi", "say bye")),
    (dict(json_object=True), lambda t: isinstance(json.loads(t), dict)),
], ids=["regex", "choice", "lark", "gbnf", "json-object"])
def test_other_constraints(tiny: LLM, spec: dict, check: object) -> None:
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=MAX_TOKENS, structured_outputs=so(**spec))
    c = tiny.generate(PROMPT, params)[0].outputs[0]
    assert c.finish_reason == "stop" and check(c.text), c.text  # type: ignore[operator]


def test_n_seeds_and_logprobs(tiny: LLM) -> None:
    """n > 1 gives each sample its own matcher; a seed reproduces; logprobs stay the model's (finite)."""
    schema = SCHEMAS["person_record"]
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=MAX_TOKENS, logprobs=3,
                            structured_outputs=so(json=schema))
    first, again = (tiny.generate(PROMPT, params)[0] for _ in range(2))
    texts = [c.text for c in first.outputs]
    assert all(valid(schema, t) for t in texts) and len(set(texts)) > 1
    assert texts == [c.text for c in again.outputs]
    for c in first.outputs:
        assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
        assert all(np.isfinite(e.sampled.logprob) and len(e.top) == 3 for e in c.logprobs)


def test_stop_strings_and_min_tokens_with_a_grammar(tiny: LLM) -> None:
    schema = SCHEMAS["flat_object"]
    stop = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop=['"age"'],
                          structured_outputs=so(json=schema))
    c = tiny.generate(PROMPT, stop)[0].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == '"age"' and c.text.startswith('{"name": ')
    forced = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, min_tokens=300, ignore_eos=True,
                            structured_outputs=so(json=schema))
    c = tiny.generate(PROMPT, forced)[0].outputs[0]  # the grammar's end ends it, min_tokens or not
    assert c.finish_reason == "stop" and valid(schema, c.text) and len(c.token_ids) < 300


def test_length_cuts_a_constrained_output(tiny: LLM) -> None:
    c = tiny.generate(PROMPT, SamplingParams(max_tokens=3, structured_outputs=so(json=SCHEMAS["order"])))
    assert c[0].outputs[0].finish_reason == "length" and '{"order_id": '.startswith(c[0].outputs[0].text)


def test_a_dead_end_finishes_with_grammar_error(tiny: LLM) -> None:
    """A regex no text matches compiles, but no token is ever allowed: the request ends at once with
    finish_reason grammar_error and the engine's reason, next to an unconstrained request that runs on."""
    dead = SamplingParams(max_tokens=20, structured_outputs=so(regex=r"[^\s\S]"))
    free = SamplingParams(max_tokens=5, ignore_eos=True)
    out_dead, out_free = tiny.generate([PROMPT, PROMPT], [dead, free])
    c = out_dead.outputs[0]
    assert c.finish_reason == GRAMMAR_ERROR and c.text == "" and c.token_ids == []
    assert isinstance(c.stop_reason, str) and c.stop_reason
    assert len(out_free.outputs[0].token_ids) == 5


@pytest.mark.parametrize("spec,message", [
    (dict(json='{"type": "object", "properties": {"a": {"type": "strin"}}}'), "strin"),
    (dict(json='{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}'), "uniqueItems"),
    (dict(json="{not json"), "JSON schema"),
    (dict(regex="(unclosed"), "regular expression"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
], ids=["bad-type", "unsupported-keyword", "not-json", "bad-regex", "bad-grammar"])
def test_uncompilable_constraints_are_request_errors(tiny: LLM, spec: dict, message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)) as err:
        tiny.generate(PROMPT, SamplingParams(structured_outputs=so(**spec)))
    assert isinstance(err.value, InvalidRequestError)


def test_spec_validation_and_cache(tiny: LLM) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        so(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        so()
    a = so(json={"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}})
    b = so(json={"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}})
    assert a.key != b.key  # property order orders the output
    grammars = tiny.engine.grammars
    assert grammars is not None
    spec = so(json={"type": "object", "properties": {"only_in_this_test": SCHEMAS["event"]}})
    first, compiled = grammars.get(spec)
    again, compiled_again = grammars.get(so(json=json.loads(spec.json or "")))
    assert compiled and not compiled_again and first is again and first.compile_seconds > 0
    assert "json_schema" in lark_of(spec)


def test_overlapped_decoding_gives_the_same_outputs(tiny_model_dir: Path) -> None:
    """The next step's forward is queued before the host advances the matchers: masks apply at sampling,
    so constrained outputs are those of serial decoding, greedy and seeded."""
    names = ["order", "event", "nested_arrays", "recursive_tree_bounded"]
    params = [SamplingParams(temperature=t, seed=5, max_tokens=MAX_TOKENS,
                             structured_outputs=so(json=SCHEMAS[n])) for n in names for t in (0.0, 1.0)]
    kw = dict(max_num_seqs=8, max_model_len=512)
    serial = LLM(str(tiny_model_dir), overlap_decode=False, **kw).generate([PROMPT] * len(params), params)
    overlap = LLM(str(tiny_model_dir), overlap_decode=True, **kw).generate([PROMPT] * len(params), params)
    assert [o.outputs[0].token_ids for o in serial] == [o.outputs[0].token_ids for o in overlap]


def test_padded_vocabulary_is_never_sampled(tmp_path: Path) -> None:
    """A model whose vocabulary is larger than its tokenizer's: the extra ids are masked out."""
    model_dir = make_tiny_model(tmp_path / "padded", vocab_size=432)
    llm = LLM(str(model_dir), max_num_seqs=8, max_model_len=512)
    tok_size = llm.tokenizer.vocab_size
    assert llm.engine.model_config.vocab_size > tok_size
    params = SamplingParams(n=8, temperature=1.5, seed=1, max_tokens=MAX_TOKENS,
                            structured_outputs=so(json=SCHEMAS["top_level_string"]))
    for c in llm.generate(PROMPT, params)[0].outputs:
        assert max(c.token_ids) < tok_size and valid(SCHEMAS["top_level_string"], c.text)


def test_llguidance_tokenizer_matches_ours(tiny: LLM) -> None:
    """The grammar engine reads the same vocabulary: its bytes for a token decode to our text."""
    grammars = tiny.engine.grammars
    assert grammars is not None and isinstance(grammars.tokenizer, llguidance.LLTokenizer)
    ids = tiny.tokenizer.encode('{"a": [1, 2], "b": "café"}', add_special_tokens=False)
    assert grammars.tokenizer.decode_str(ids) == tiny.tokenizer.decode(ids)


def test_row_by_row_sampling_keeps_the_masks(tiny: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """When one request's sampling raises, the others are sampled row by row: with their own masks."""
    sampler = tiny.engine.sampler
    real = sampler.sample

    def sample(logits: torch.Tensor, seqs: list, *args: object) -> object:
        if any(s.request.params.seed == 13 for s in seqs):
            raise ValueError("boom")
        return real(logits, seqs, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(sampler, "sample", sample)
    schema = SCHEMAS["classification"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=MAX_TOKENS,
                             structured_outputs=so(json=schema)) for s in (1, 13, 2)]
    outs = tiny.generate([PROMPT] * 3, params)
    assert [o.outputs[0].finish_reason for o in outs] == ["stop", "error", "stop"]
    assert valid(schema, outs[0].outputs[0].text) and valid(schema, outs[2].outputs[0].text)
