"""Grammar engines side by side on this machine's CPU: llguidance, xgrammar and outlines-core.

For each tokenizer (the bundled demo model's 4096-token BPE, the 32000-token ASCII BPE of
tools/make_random_model.py that the GPU serving benchmark uses, and a 32000-token byte-level BPE trained
on the Python standard library's sources, closer to a natural-language vocabulary) and each engine:
- setup: building the engine's tokenizer view once;
- compile: every JSON Schema of tests/data/json_schemas.json, cold (no cache), compact JSON
  (separators ", " and ": ", no free whitespace): p50 / p99 / max and the schemas it rejects;
- mask: the time to fill one token bitmask, per token, over the same token traces for every engine
  (random walks through each schema's grammar drawn once with llguidance, seeded, at most 160 tokens);
  and one step of 64 sequences at 64 different points of a trace, through the engine's batched call where
  it has one (p50 over the schemas);
- validity: each engine's own random walk per schema (uniform over the tokens it allows, ending once EOS
  is allowed); the text must parse and validate against the schema (jsonschema, formats checked).

The engines are not Fenwick dependencies; install them to run this:
    pip install llguidance xgrammar outlines-core
    python bench/grammar_engines.py --out docs/runs/grammar-engines-cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from fenwick_llm.tools import make_random_model

REPO = Path(__file__).resolve().parent.parent
SCHEMAS = REPO / "tests" / "data" / "json_schemas.json"
DEMO = REPO / "models" / "fenwick-shakespeare" / "tokenizer.json"
MAX_TRACE = 160


def stdlib_bpe(vocab: int) -> tokenizers.Tokenizer:
    """Byte-level BPE trained on the standard library's .py files (deterministic for one Python)."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))[:1500]
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((f.read_text(errors="replace") for f in files), trainer)
    return tok


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a byte is written as -> the byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def token_bytes(tok: tokenizers.Tokenizer) -> list[bytes | None]:
    """Each id's bytes (None for special tokens)."""
    dec = byte_decoder()
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    out: list[bytes | None] = [None] * tok.get_vocab_size(with_added_tokens=True)
    for s, i in tok.get_vocab(with_added_tokens=True).items():
        out[i] = None if s in special else bytes(dec[c] for c in s)
    return out


# ---- engines: each gives setup(tok) -> ctx, compile(ctx, schema) -> grammar, matcher(ctx, grammar) ->
# (fill(mask_row), consume(token) -> bool), and optionally a batched fill ----------------------------------

OPTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class LLGuidance:
    name = "llguidance"

    def setup(self, tok: tokenizers.Tokenizer, vocab: int) -> Any:
        import llguidance as llg

        self.llg = llg
        self.executor = llg.LLExecutor()
        return llg.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=0)

    def compile(self, ctx: Any, schema: dict) -> Any:
        g = self.llg.LLMatcher.grammar_from_json_schema(schema, defaults=OPTS)
        m = self.llg.LLMatcher(ctx, g, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, ctx: Any, grammar: Any) -> tuple[Callable, Callable]:
        m = grammar.deep_copy()
        return (lambda row: m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)), m.consume_token

    def fill_batch(self, matchers: list[Any], mask: np.ndarray) -> None:
        self.executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], mask.ctypes.data,
                                              mask.shape[1] * 4, mask.shape[0])

    def batch_matchers(self, ctx: Any, grammar: Any, n: int) -> list[Any]:
        return [grammar.deep_copy() for _ in range(n)]

    @staticmethod
    def advance(m: Any, ids: list[int]) -> None:
        m.consume_tokens(ids)


class XGrammar:
    name = "xgrammar"

    def setup(self, tok: tokenizers.Tokenizer, vocab: int) -> Any:
        import xgrammar as xgr

        self.xgr = xgr
        encoded = [""] * tok.get_vocab_size(with_added_tokens=True)
        for s, i in tok.get_vocab(with_added_tokens=True).items():
            encoded[i] = s
        info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=[0])
        self.batch = xgr.BatchGrammarMatcher()
        return info

    def compile(self, ctx: Any, schema: dict) -> Any:
        compiler = self.xgr.GrammarCompiler(ctx, cache_enabled=False)  # cold: no cache between schemas
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=(", ", ": "))

    def matcher(self, ctx: Any, grammar: Any) -> tuple[Callable, Callable]:
        m = self.xgr.GrammarMatcher(grammar)
        return (lambda row: m.fill_next_token_bitmask(row[None, :])), m.accept_token

    def batch_matchers(self, ctx: Any, grammar: Any, n: int) -> list[Any]:
        return [self.xgr.GrammarMatcher(grammar) for _ in range(n)]

    @staticmethod
    def advance(m: Any, ids: list[int]) -> None:
        for t in ids:
            m.accept_token(t)

    def fill_batch(self, matchers: list[Any], mask: np.ndarray) -> None:
        import torch

        self.batch.batch_fill_next_token_bitmask(matchers, torch.from_numpy(mask))


class OutlinesCore:
    name = "outlines-core"

    def setup(self, tok: tokenizers.Tokenizer, vocab: int) -> Any:
        import outlines_core as oc

        self.oc = oc
        table: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok)):
            if b is not None:
                table.setdefault(b, []).append(i)
        return oc.Vocabulary(0, table)

    def compile(self, ctx: Any, schema: dict) -> Any:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), r" ?")
        return self.oc.Index(regex, ctx)

    def matcher(self, ctx: Any, grammar: Any) -> tuple[Callable, Callable]:
        g = self.oc.Guide(grammar)

        def consume(t: int) -> bool:
            try:
                g.advance(t)
                return True
            except Exception:  # outlines raises on a token the state does not allow
                return False
        return (lambda row: g.write_mask_into(row.ctypes.data, row.size, 4)), consume

    def batch_matchers(self, ctx: Any, grammar: Any, n: int) -> list[Any]:
        return [self.oc.Guide(grammar) for _ in range(n)]

    @staticmethod
    def advance(m: Any, ids: list[int]) -> None:
        for t in ids:
            m.advance(t)

    def fill_batch(self, matchers: list[Any], mask: np.ndarray) -> None:
        for i, g in enumerate(matchers):  # no batched call: one after the other
            g.write_mask_into(mask[i].ctypes.data, mask.shape[1], 4)


def traces(tok: tokenizers.Tokenizer, vocab: int, schemas: dict[str, dict],
           seed: int) -> dict[str, list[int]]:
    """A random walk of allowed tokens through each schema's grammar (llguidance), uniform over the allowed
    ones, ending at the grammar's end or MAX_TRACE tokens."""
    import llguidance as llg

    lt = llg.LLTokenizer(tok.to_str(), n_vocab=vocab, eos_token=0)
    rng = random.Random(seed)
    words = (vocab + 31) // 32
    out: dict[str, list[int]] = {}
    for name, schema in schemas.items():
        m = llg.LLMatcher(lt, llg.LLMatcher.grammar_from_json_schema(schema, defaults=OPTS), log_level=0)
        row = np.zeros(words, dtype=np.int32)
        ids: list[int] = []
        while not m.is_stopped() and len(ids) < MAX_TRACE and not m.is_error():
            m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)
            bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
            allowed = [int(i) for i in np.flatnonzero(bits) if i != 0]
            if not allowed:
                break
            t = rng.choice(allowed)
            m.consume_token(t)
            ids.append(t)
        out[name] = ids
    return out


def validity(engine: Any, ctx: Any, grammars: dict[str, Any], tok: tokenizers.Tokenizer, vocab: int,
             schemas: dict[str, dict], seed: int) -> tuple[int, list[str]]:
    """Each engine's own random walk per schema (uniform over its allowed tokens, ending as soon as EOS is
    allowed): (walks that ended, names whose text does not parse or validate)."""
    from jsonschema import Draft202012Validator

    rng = random.Random(seed)
    row = np.zeros((vocab + 31) // 32, dtype=np.int32)
    ended, invalid = 0, []
    for name, g in grammars.items():
        fill, consume = engine.matcher(ctx, g)
        ids: list[int] = []
        done = False
        for _ in range(400):
            fill(row)
            bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab]
            if bits[0]:
                done = True
                break
            allowed = np.flatnonzero(bits)
            if not len(allowed):
                break
            t = int(allowed[rng.randrange(len(allowed))])
            if not consume(t):
                break
            ids.append(t)
        if not done:
            continue
        ended += 1
        try:
            value = json.loads(tok.decode(ids))
            checker = Draft202012Validator.FORMAT_CHECKER
            ok = Draft202012Validator(schemas[name], format_checker=checker).is_valid(value)
        except ValueError:
            ok = False
        if not ok:
            invalid.append(name)
    return ended, invalid


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def run_engine(engine: Any, tok: tokenizers.Tokenizer, vocab: int, schemas: dict[str, dict],
               walks: dict[str, list[int]], seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    ctx = engine.setup(tok, vocab)
    setup_s = time.perf_counter() - t0
    compile_ms: list[float] = []
    failed: dict[str, str] = {}
    grammars: dict[str, Any] = {}
    for name, schema in schemas.items():
        t0 = time.perf_counter()
        try:
            grammars[name] = engine.compile(ctx, schema)
        except Exception as e:  # an engine's own error type for a schema it cannot handle
            failed[name] = str(e).splitlines()[0][:160]
            continue
        compile_ms.append((time.perf_counter() - t0) * 1e3)
    mask_us: list[float] = []
    rejected = 0
    row = np.zeros((vocab + 31) // 32, dtype=np.int32)
    for name, g in grammars.items():
        fill, consume = engine.matcher(ctx, g)
        for t in walks[name]:
            t0 = time.perf_counter()
            fill(row)
            mask_us.append((time.perf_counter() - t0) * 1e6)
            if not consume(t):
                rejected += 1  # the engine's JSON differs here (a format's regex): stop this trace
                break
    batch_ms: list[float] = []
    mask = np.zeros((64, row.size), dtype=np.int32)
    for name, g in grammars.items():
        ms = engine.batch_matchers(ctx, g, 64)
        walk = walks[name]
        try:  # sequence i stands i tokens into the trace (mod its length): 64 different states
            for i, m in enumerate(ms):
                engine.advance(m, walk[:i % max(1, len(walk))])
        except Exception:  # the engine rejects a token of this trace: no batch for this schema
            continue
        t0 = time.perf_counter()
        engine.fill_batch(ms, mask)
        batch_ms.append((time.perf_counter() - t0) * 1e3)
    ended, invalid = validity(engine, ctx, grammars, tok, vocab, schemas, seed)
    return {
        "valid": {"walks_ended": ended, "invalid": invalid},
        "setup_s": setup_s, "compiled": len(compile_ms), "failed": failed,
        "compile_ms": {"p50": pct(compile_ms, 50), "p99": pct(compile_ms, 99), "max": max(compile_ms or [0])},
        "mask_us": {"mean": statistics.fmean(mask_us) if mask_us else float("nan"), "p50": pct(mask_us, 50),
                    "p99": pct(mask_us, 99), "tokens": len(mask_us)},
        "traces_rejected": rejected,
        "batch64_mask_ms": {"p50": pct(batch_ms, 50), "max": max(batch_ms or [0])},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", nargs="+", default=["llguidance", "xgrammar", "outlines-core"])
    ap.add_argument("--tokenizers", nargs="+", default=["demo-4k", "ascii-32k", "stdlib-32k"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = ap.parse_args()
    schemas = json.loads(SCHEMAS.read_text())
    makers = {"demo-4k": lambda: (tokenizers.Tokenizer.from_file(str(DEMO)), 4096),
              "ascii-32k": lambda: (make_random_model.ascii_bpe(32000), 32000),
              "stdlib-32k": lambda: (stdlib_bpe(32000), 32000)}
    engines = {e.name: e for e in (LLGuidance(), XGrammar(), OutlinesCore())}
    results: dict[str, Any] = {}
    for tname in a.tokenizers:
        tok, vocab = makers[tname]()
        walks = traces(tok, vocab, schemas, a.seed)
        print(f"== {tname}: vocab {vocab}, {len(schemas)} schemas, "
              f"{sum(map(len, walks.values()))} trace tokens", flush=True)
        for ename in a.engines:
            r = run_engine(engines[ename], tok, vocab, schemas, walks, a.seed)
            results[f"{tname}/{ename}"] = r
            c, m = r["compile_ms"], r["mask_us"]
            print(f"{ename:14s} setup {r['setup_s']:7.2f} s | compiled {r['compiled']}/{len(schemas)} "
                  f"p50 {c['p50']:8.2f} ms p99 {c['p99']:8.2f} ms max {c['max']:8.2f} ms | mask/token "
                  f"mean {m['mean']:7.1f} us p99 {m['p99']:7.1f} us | batch64 p50 "
                  f"{r['batch64_mask_ms']['p50']:6.2f} ms | traces cut {r['traces_rejected']}", flush=True)
            print(f"{'':14s} own random walks: {r['valid']['walks_ended']} ended, invalid JSON for "
                  f"{r['valid']['invalid'] or 'none'}")
            for name, err in r["failed"].items():
                print(f"    rejects {name}: {err}")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
