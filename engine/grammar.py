"""The grammar engine (llguidance): StructuredOutputsParams -> compiled grammars, cached by spec.

Compiling builds llguidance's lexer and parser for the model's tokenizer (well under a millisecond for
most JSON Schemas, tens of milliseconds for large ones: docs/structured-outputs.md); a compiled grammar
hands out matchers as copies of a template in its start state (microseconds). The compiler is
thread-safe: the API server compiles in worker threads, off the event loop, and the engine core finds
the result in the cache when the request arrives. Why llguidance and not xgrammar or outlines-core is in
docs/structured-outputs.md (measured).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance

from .errors import InvalidRequestError
from .json_formats import strict_formats
from .structured_params import StructuredOutputsParams
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# compact JSON: fixed separators and no free whitespace, so a model cannot spin on blanks
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(InvalidRequestError):
    """A constraint the grammar engine cannot compile; the message names the problem."""


@dataclass(frozen=True)
class CompiledGrammar:
    kind: str  # StructuredOutputsParams.kind
    template: llguidance.LLMatcher  # in its start state, never advanced: matchers are its copies
    compile_seconds: float  # wall time of the compile that made it

    def matcher(self) -> llguidance.LLMatcher:
        return self.template.deep_copy()


def lark_of(params: StructuredOutputsParams) -> str:
    """The constraint as llguidance's grammar text (raises ValueError for a spec that is not even text of
    its kind, e.g. a schema that is not JSON)."""
    kind = params.kind
    if kind in ("json", "json_object"):
        schema = strict_formats(json.loads(params.json)) if kind == "json" else {"type": "object"}
        options = (COMPACT_JSON if params.whitespace_pattern is None else
                   {"whitespace_flexible": True, "whitespace_pattern": params.whitespace_pattern})
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=options)  # type: ignore[arg-type]
    if kind == "choice":
        return llguidance.grammar_from("choice", json.dumps(list(params.choice or ())))
    if kind == "regex":
        return llguidance.grammar_from("regex", str(params.regex))
    return llguidance.grammar_from("grammar", str(params.grammar))  # Lark, or GBNF converted to Lark


class GrammarCompiler:
    """Compiles constraints for one tokenizer; keeps the last ``cache_size`` grammars (LRU)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = 256) -> None:
        self.vocab_size = vocab_size  # logits columns; ids past the tokenizer are never allowed
        eos = sorted(eos_token_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,  # lists: llguidance 1.7+
                                                eos_token=eos[0] if len(eos) == 1 else eos)
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str, str | None], CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def is_cached(self, params: StructuredOutputsParams) -> bool:
        with self._lock:
            return params.key in self._cache

    def get(self, params: StructuredOutputsParams) -> tuple[CompiledGrammar, bool]:
        """(the compiled grammar, whether this call compiled it); GrammarError if it cannot compile."""
        key = params.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit, False
        grammar = self.compile(params)  # outside the lock: llguidance releases the GIL while it builds
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return grammar, True

    def compile(self, params: StructuredOutputsParams) -> CompiledGrammar:
        t0 = time.perf_counter()
        try:
            text = lark_of(params)
        except ValueError as exc:
            raise GrammarError(f"{_what(params)}: {exc}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{_what(params)}: {first_line(matcher.get_error())}")
        return CompiledGrammar(params.kind, matcher, time.perf_counter() - t0)


def _what(params: StructuredOutputsParams) -> str:
    return {"json": "the JSON schema cannot be used", "json_object": "json_object",
            "regex": "the regular expression cannot be used", "choice": "the choice list cannot be used",
            "grammar": "the grammar cannot be used"}[params.kind]


def first_line(message: str, limit: int = 300) -> str:
    """llguidance's errors carry a parser-state dump after the first line: the line is what users need."""
    line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    return line[:limit]


def compiler_for(tokenizer: Tokenizer, vocab_size: int,
                 eos_token_ids: Sequence[int]) -> GrammarCompiler | None:
    """A compiler for the model's tokenizer (llguidance reads the ``tokenizers`` JSON, special tokens too);
    None, with a warning, for one it cannot read: unconstrained serving goes on, constrained requests get
    an error."""
    try:
        return GrammarCompiler(tokenizer.tokenizer.to_str(), vocab_size, eos_token_ids)
    except Exception:  # llguidance's own errors for a tokenizer it does not support
        logger.warning("no grammar engine for this tokenizer: structured outputs are off", exc_info=True)
        return None
