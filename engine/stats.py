"""Stats the engine emits after every step; the server turns them into Prometheus metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from .prefix_cache import PrefixCacheStats


@dataclass
class FinishedRequestStats:
    finish_reason: str  # "stop", "length" or "abort"
    e2e_latency: float  # seconds from arrival to the last token
    queue_time: float  # seconds from arrival to the first scheduled step
    num_prompt_tokens: int
    num_generation_tokens: int


@dataclass
class EngineStats:
    num_running: int = 0  # requests holding a state slot
    num_waiting: int = 0  # requests queued for a slot
    slots_used: int = 0
    slots_total: int = 0
    state_memory_bytes: int = 0  # bytes of the allocated state pool
    num_prompt_tokens: int = 0  # prompt tokens prefilled in this step
    num_generation_tokens: int = 0  # tokens sampled in this step
    iteration_tokens: int = 0  # all tokens the model ran in this step
    time_to_first_tokens: list[float] = field(default_factory=list)  # for requests that got their first token
    inter_token_latencies: list[float] = field(default_factory=list)  # one per decode token this step
    finished: list[FinishedRequestStats] = field(default_factory=list)
    prefix_cache: PrefixCacheStats | None = None  # lookups and hits this step, bytes held (None: caching off)
