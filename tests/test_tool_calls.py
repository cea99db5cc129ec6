"""Tool calls without a model: the chat template's format against the server's reader, the grammar a
tool_choice builds (walked with llguidance), and streaming deltas assembled as the openai package does."""

from __future__ import annotations

import json
import random

import llguidance
import numpy as np
import pytest
from fenwick_llm.engine.tokenizer import Tokenizer
from fenwick_llm.models import demo_model_dir
from fenwick_llm.server import tool_calls
from fenwick_llm.server.tool_calls import CallStream, complete_calls, maybe_calls, parse
from fenwick_llm.tools import data
from jsonschema import Draft202012Validator

OLD_TEMPLATE = (  # the template the demo model was trained with: plain chats must render the same
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|endoftext|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}}]
CALLS = [{"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "c"}'}},
         {"id": "call_2", "type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_dir(demo_model_dir())


def test_template_renders_plain_chats_as_before(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}]
    for gen in (True, False):
        want = tok.apply_chat_template(msgs, gen, chat_template=OLD_TEMPLATE)
        assert tok.apply_chat_template(msgs, gen) == want == data.render_chat(msgs, gen)
    assert tok.chat_template == data.CHAT_TEMPLATE and tool_calls.template_has_tool_calls(tok.chat_template)
    assert not tool_calls.template_has_tool_calls(OLD_TEMPLATE)


def test_template_and_reader_agree_on_the_format(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "", "tool_calls": CALLS},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = tok.apply_chat_template(msgs, True, tools=TOOLS)
    assert text == data.render_chat(msgs, True, tools=TOOLS)
    assert "Be brief.\n\n# Tools" in text and "<tool_response>\nsunny\n</tool_response>" in text
    reply = text.split("<|assistant|>\n")[-2].split("<|endoftext|>")[0]  # the assistant turn with calls
    assert complete_calls(reply) == [("get_weather", '{"city": "Paris", "unit": "c"}'),
                                     ("add", '{"a": 1, "b": 2}')]


def _walk(grammar: str, tok: Tokenizer, seed: int, force: str = "") -> str:
    lt = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=tok.vocab_size, eos_token=0)
    m = llguidance.LLMatcher(lt, llguidance.grammar_from("lark", grammar), log_level=0)
    assert not m.is_error(), m.get_error()
    ids = tok.encode(force, add_special_tokens=False) if force else []
    assert m.consume_tokens(ids)
    rng = random.Random(seed)
    row = np.zeros((tok.vocab_size + 31) // 32, dtype=np.int32)
    while not m.is_stopped():
        m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
        allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")[:tok.vocab_size])
        t = int(allowed[rng.randrange(len(allowed))]) if len(allowed) > 1 or allowed[0] else 0
        if t == 0:
            break
        assert m.consume_token(t)
        ids.append(t)
    return tok.decode(ids)


@pytest.mark.parametrize("parallel", [True, False])
def test_required_grammar_only_makes_valid_calls(tok: Tokenizer, parallel: bool) -> None:
    functions = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    grammar = tool_calls.calls_grammar(functions, parallel, None)
    for seed in range(5):
        text = _walk(grammar, tok, seed)
        calls = complete_calls(text)
        assert calls and len(calls) <= (tool_calls.MAX_CALLS if parallel else 1), text
        for name, args in calls:
            assert Draft202012Validator(functions[name]).is_valid(json.loads(args))


def test_auto_grammar_is_text_or_calls(tok: Tokenizer) -> None:
    grammar = tool_calls.calls_grammar({"get_weather": WEATHER}, True, tool_calls.ANY_TEXT)
    text = _walk(grammar, tok, 0, force="<tool_call>\n")
    assert [n for n, _ in complete_calls(text)] == ["get_weather"] * len(complete_calls(text))
    lt = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=tok.vocab_size, eos_token=0)
    m = llguidance.LLMatcher(lt, llguidance.grammar_from("lark", grammar), log_level=0)
    bad = tok.encode('<tool_call>\n{"name": "nope"', add_special_tokens=False)
    assert m.validate_tokens(bad) < len(bad)  # a call must be a real call once it starts
    m = llguidance.LLMatcher(lt, llguidance.grammar_from("lark", grammar), log_level=0)
    assert m.consume_tokens(tok.encode("Just text, <tool_call> inside is fine.", add_special_tokens=False))


def test_streaming_deltas_assemble_to_the_calls() -> None:
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par}is", "unit": "c"}}\n</tool_call>'
            '\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": {"c": 2}}}\n</tool_call>')
    stream, assembled = CallStream(), {}
    for end in range(len(text) + 1):  # one character at a time, the worst case
        for entry in stream.advance(text[:end]):
            call = assembled.setdefault(entry["index"], {"id": None, "name": None, "arguments": ""})
            call["id"] = entry.get("id", call["id"])
            call["name"] = entry.get("function", {}).get("name", call["name"])
            call["arguments"] += entry["function"].get("arguments") or ""
    assert [(c["name"], c["arguments"]) for c in assembled.values()] == complete_calls(text)
    assert all(c["id"].startswith("call_") for c in assembled.values())


def test_reader_edge_cases() -> None:
    assert parse("hello") is None and maybe_calls("<tool") and maybe_calls("") and not maybe_calls("x")
    cut = parse('<tool_call>\n{"name": "add", "arguments": {"a": 1}')
    assert cut is not None and cut[0].name == "add" and not cut[0].complete and cut[0].arguments == '{"a": 1'
    assert complete_calls('<tool_call>\n{"name": "add", "arguments": {"a": 1}') == []


def test_closed_objects_restrict_only_where_properties_are_listed() -> None:
    from fenwick_llm.server.structured import closed_objects

    inner = {"type": "object", "properties": {"b": {"type": "integer"}}}
    free = {"type": "object", "additionalProperties": True}
    schema = {"type": "object", "properties": {"a": inner, "m": free},
              "$defs": {"d": {"properties": {"x": {}}}}, "anyOf": [{"properties": {"y": {}}}]}
    out = closed_objects(schema)
    assert "additionalProperties" not in out  # beside anyOf: its properties would be excluded
    assert out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["m"]["additionalProperties"] is True
    assert out["$defs"]["d"]["additionalProperties"] is False
    assert out["anyOf"][0]["additionalProperties"] is False
    assert "additionalProperties" not in schema["properties"]["a"]  # a copy
