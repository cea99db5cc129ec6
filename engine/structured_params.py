"""What a request's output must match: a serializable spec (strings only) that travels in SamplingParams.

Named after vLLM's structured-outputs parameters. Exactly one constraint is set; the grammar engine
(engine/grammar.py) compiles it, the API server ahead of time (off the event loop) and the engine core
again on a cache miss, so the spec is all that crosses between them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: str | None = None  # a JSON Schema as JSON text (a dict is serialized on construction)
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches this regular expression (Rust regex syntax)
    choice: tuple[str, ...] | None = None  # the output is one of these strings
    grammar: str | None = None  # a context-free grammar: llguidance's Lark dialect, or GBNF (llama.cpp)
    # JSON only: a regular expression for the whitespace allowed between tokens; None is compact JSON with
    # fixed separators ", " and ": " (a model cannot loop on whitespace)
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, list, bool)):
            object.__setattr__(self, "json", _dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise ValueError(f"structured_outputs must set exactly one of {', '.join(KINDS)}; got "
                             f"{', '.join(set_) or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c
                                                                  for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        """Which constraint: one of KINDS."""
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, str | None]:
        """The compile cache's key: same key, same grammar (property order kept: it orders the output)."""
        kind = self.kind
        spec = {"json_object": "", "choice": _dumps(list(self.choice or ()))}.get(kind, getattr(self, kind))
        return kind, str(spec), self.whitespace_pattern


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
