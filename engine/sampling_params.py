"""Per-request sampling parameters, validated at construction (bad values raise ValueError).

The bounds are what the engine's types hold (seeds are 64-bit, top_k an int64, every float finite), so
that no value accepted here can fail later inside the engine's step; the server's schemas use the same
constants. What depends on the model (vocabulary, context, slots) is checked by EngineCore.make_request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .structured_params import StructuredOutputsParams

SEED_MIN = -(2**63)  # seeds are taken modulo 2**64: [-2**63, 2**64) covers int64 and uint64
SEED_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20  # OpenAI's bound on top_logprobs
# below this a temperature is treated as 0 (greedy): dividing logits by it would overflow float32
MIN_TEMPERATURE = 1e-5


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; n > 1 forks the state after one prefill
    temperature: float = 1.0  # 0 (or below MIN_TEMPERATURE) means greedy
    top_p: float = 1.0  # nucleus mass in (0, 1]
    top_k: int = 0  # 0 or -1 disables; above the vocabulary size it keeps every token
    min_p: float = 0.0  # drop tokens below min_p * max prob
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in prompt or output (CTRL style)
    presence_penalty: float = 0.0  # OpenAI style, in [-2, 2]
    frequency_penalty: float = 0.0  # OpenAI style, in [-2, 2]
    seed: int | None = None  # per-request generator, all 64 bits count; reproduces regardless of batch
    stop: list[str] = field(default_factory=list)  # stop strings, never included in the text
    stop_token_ids: list[int] = field(default_factory=list)  # extra stop tokens (kept out of the text)
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many are generated
    ignore_eos: bool = False
    logprobs: int | None = None  # number of top logprobs per token (0: only the sampled token's)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        for name in ("n", "top_k", "min_tokens"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer")
        for name in ("seed", "max_tokens", "logprobs"):
            if getattr(self, name) is not None and not _is_int(getattr(self, name)):
                raise ValueError(f"{name} must be an integer or None")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            if not _is_real(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        checks = [
            (self.n >= 1, "n must be at least 1"),
            (self.temperature >= 0.0, "temperature must be non-negative"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (-1 <= self.top_k <= INT64_MAX, f"top_k must be -1 or 0 (disabled) or in [1, {INT64_MAX}]"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be positive"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
             f"seed must be in [{SEED_MIN}, {SEED_MAX}] (64 bits)"),
            (self.max_tokens is None or self.max_tokens >= 1, "max_tokens must be at least 1"),
            (self.min_tokens >= 0, "min_tokens must be non-negative"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "min_tokens must not exceed max_tokens"),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
             f"logprobs must be in [0, {MAX_LOGPROBS}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(_is_int(t) and 0 <= t <= INT64_MAX for t in self.stop_token_ids),
             "stop_token_ids must be non-negative integers"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def seed64(self) -> int | None:
        """The seed as an unsigned 64-bit integer."""
        return None if self.seed is None else self.seed % 2**64
