"""EngineConfig: frozen and validated at construction (built once at the CLI / LLM edge)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model_config import ModelConfig

_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
MiB, GiB = 1 << 20, 1 << 30
_CANON = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _dtype_name(value: str | torch.dtype, what: str) -> str:
    if isinstance(value, torch.dtype):
        if value not in _CANON:
            raise ValueError(f"{what} {value} is not supported")
        return _CANON[value]
    if value not in _DTYPES:
        raise ValueError(f"{what} must be one of {sorted(_DTYPES)}, got {value!r}")
    return _CANON[_DTYPES[value]]


def default_graph_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_num_seqs} | set(range(16, max_num_seqs + 1, 16))
    return tuple(sorted(sizes | {max_num_seqs}))


@dataclass(frozen=True)
class EngineConfig:
    model: str  # model directory (config.json, model.safetensors, tokenizer.json)
    device: str = "auto"  # "auto" resolves to "cuda" when available, else "cpu"
    dtype: str | torch.dtype = "auto"  # weights / activations; "auto": bfloat16 on CUDA, float32 on CPU
    state_dtype: str | torch.dtype = "float32"  # Fenwick levels: float32 (default) or bfloat16
    max_num_seqs: int = 256  # sequences holding a state slot at once (capped by memory at start-up)
    max_model_len: int | None = None  # prompt + output limit; None: the model's; never above it
    max_num_batched_tokens: int | None = None  # per-step tokens (decodes + prompt chunks)
    long_prefill_chunk: int | None = None  # most prompt tokens one request runs in one step; None: the budget
    max_waiting: int = 1024  # waiting-queue bound; beyond it requests get QueueFullError
    enforce_eager: bool = False  # no CUDA graphs for decode
    # queue the next decode step on the device before the host reads this step's tokens (EngineCore);
    # None: on where decode runs from CUDA graphs
    overlap_decode: bool | None = None
    cuda_graph_batch_sizes: tuple[int, ...] | None = None  # decode batch sizes to capture; None: default set
    # prompt steps replayed from CUDA graphs captured at start-up per bucket of padded shape
    # (engine/prefill_graphs.py), with graphs on: steps of up to so many tokens (None: max_num_batched_tokens;
    # 0: prompt steps eager) in up to so many sequences
    prefill_graph_max_tokens: int | None = None
    prefill_graph_max_seqs: int = 16
    seed: int = 0  # generator of requests without their own seed
    # torch intra-op threads of the engine-core process (`fenwick serve`); None: torch's count capped by the
    # CPUs the process may use, its affinity and cgroup quota (engine/cpus.py)
    cpu_threads: int | None = None
    served_model_name: str | None = None  # name in the API; None: the model directory's name
    memory_fraction: float = 0.9  # of free GPU memory / available RAM for the state pool
    # keep snapshots of request states by token prefix and restore them into new requests (prefix_cache.py)
    enable_prefix_caching: bool = True
    prefix_cache_interval: int = 2048  # also snapshot prompts every this many tokens (0: only ends, branches)
    # device memory for snapshots, taken only from what the state pool's budget leaves beside its slots;
    # None: 4 GiB on CUDA, 64 MiB on the CPU
    prefix_cache_bytes: int | None = None
    # pinned host memory for snapshots evicted from the device; None: 4 GiB on CUDA, 0 on the CPU
    prefix_cache_host_bytes: int | None = None
    model_config: ModelConfig = field(init=False, repr=False)  # config.json, parsed

    def __post_init__(self) -> None:
        fix = object.__setattr__
        path = Path(self.model)
        if not path.is_dir():
            raise ValueError(f"model directory not found: {self.model}")
        fix(self, "model", str(path))
        fix(self, "model_config", ModelConfig.from_file(path / "config.json"))
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        fix(self, "device", str(dev))
        dtype = self.dtype
        if dtype == "auto":
            dtype = "bfloat16" if dev.type == "cuda" else "float32"
        fix(self, "dtype", _dtype_name(dtype, "dtype"))
        fix(self, "state_dtype", _dtype_name(self.state_dtype, "state_dtype"))
        if self.state_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"state_dtype must be float32 or bfloat16, got {self.state_dtype}")
        model_len = self.model_config.max_model_len
        if self.max_model_len is None:
            fix(self, "max_model_len", model_len)
        elif not 1 <= self.max_model_len <= model_len:  # type: ignore[operator]
            raise ValueError(f"max_model_len={self.max_model_len} must be in [1, {model_len}] (model limit)")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens is None:
            fix(self, "max_num_batched_tokens", max(2048, self.max_num_seqs))
        elif self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs="
                             f"{self.max_num_seqs} (every running sequence decodes each step)")
        if self.long_prefill_chunk is None:
            fix(self, "long_prefill_chunk", self.max_num_batched_tokens)
        if self.long_prefill_chunk < 1 or self.max_waiting < 1:
            raise ValueError("long_prefill_chunk and max_waiting must be at least 1")
        if self.prefill_graph_max_tokens is None:
            fix(self, "prefill_graph_max_tokens", self.max_num_batched_tokens)
        if self.prefill_graph_max_tokens < 0 or self.prefill_graph_max_seqs < 1:
            raise ValueError("prefill_graph_max_tokens must be >= 0 and prefill_graph_max_seqs >= 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"cpu_threads must be at least 1, got {self.cpu_threads}")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError("memory_fraction must be in (0, 1]")
        on_cuda = dev.type == "cuda"
        if self.prefix_cache_bytes is None:
            fix(self, "prefix_cache_bytes", 4 * GiB if on_cuda else 64 * MiB)
        if self.prefix_cache_host_bytes is None:
            fix(self, "prefix_cache_host_bytes", 4 * GiB if on_cuda else 0)
        if min(self.prefix_cache_interval, self.prefix_cache_bytes, self.prefix_cache_host_bytes) < 0:
            raise ValueError("prefix_cache_interval, prefix_cache_bytes and prefix_cache_host_bytes must be "
                             ">= 0")
        sizes = self.cuda_graph_batch_sizes
        sizes = default_graph_sizes(self.max_num_seqs) if sizes is None else tuple(sorted(set(sizes)))
        if any(s < 1 for s in sizes):
            raise ValueError("cuda_graph_batch_sizes must be positive")
        fix(self, "cuda_graph_batch_sizes", tuple(s for s in sizes if s <= self.max_num_seqs))
        if self.served_model_name is None:
            fix(self, "served_model_name", path.resolve().name)

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[str(self.dtype)]

    @property
    def torch_state_dtype(self) -> torch.dtype:
        return _DTYPES[str(self.state_dtype)]

    @property
    def use_overlap_decode(self) -> bool:
        return self.use_cuda_graphs if self.overlap_decode is None else self.overlap_decode

    @property
    def use_cuda_graphs(self) -> bool:
        on_cuda = self.torch_device.type == "cuda"
        return on_cuda and not self.enforce_eager and bool(self.cuda_graph_batch_sizes)
