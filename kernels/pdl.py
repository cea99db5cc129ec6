"""Programmatic dependent launch (PDL) for the kernels of a decode step (sm90+).

A decode step at batch 1..8 is a chain of ~150 small kernels, each a few microseconds, and a fair part
of each is the launch itself: the next kernel's programs are scheduled only once the previous kernel
has drained. With PDL (CUDA's programmatic stream serialization, which CUDA graphs keep as a
programmatic edge) the next kernel is launched while the previous one runs:

- every kernel launched this way waits (``griddepcontrol.wait``) for the previous kernel to finish and
  flush its memory before it reads anything that kernel wrote, and only then lets its own successor
  launch (``griddepcontrol.launch_dependents``): both in ``triton_utils.wait_then_release``. So at
  most two kernels overlap, and a kernel's wait covers everything before it in the stream, transitively;
  what was written two or more launches back may therefore be read before the wait;
- before its wait, a one-row GEMV loads its slice of the weights (constants the chain never writes) into
  registers, and a wider GEMV asks L2 for it; the other step kernels load their constants, their own
  state and older outputs there too.

Kernels take a ``USE_PDL`` constexpr; ``options(t)`` gives the launch keyword arguments for a tensor's
device. The setting is the process's: ``LLM`` and ``fenwick serve`` apply ``EngineConfig.pdl`` with
``configure`` once at start-up (``--no-pdl``), before anything is compiled or captured. The interpreter
and GPUs before sm90 never use it.
"""

from __future__ import annotations

import os
from functools import cache

import torch

ENABLED = True  # see configure()
LINE_BYTES = 128  # an L2 prefetch brings one cache line


def configure(enabled: bool) -> None:
    """Launch with PDL where the device supports it. Kernels compiled or graphs captured before keep the
    setting they were built with."""
    global ENABLED
    ENABLED = enabled
    _supported.cache_clear()


@cache
def _supported(device_index: int) -> bool:
    if not ENABLED or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if torch.cuda.get_device_capability(device_index)[0] < 9:
        return False
    try:
        import triton.language.extra.cuda  # noqa: F401  (gdc_wait, gdc_launch_dependents)
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on t's device launch with PDL."""
    if not t.is_cuda:
        return False
    return _supported(t.device.index if t.device.index is not None else torch.cuda.current_device())


def options(t: torch.Tensor) -> dict:
    """Keyword arguments for a Triton launch on t's device: the kernel's USE_PDL constexpr and, where
    PDL is on, Triton's ``launch_pdl`` option."""
    return {"USE_PDL": True, "launch_pdl": True} if enabled(t) else {"USE_PDL": False}


def prefetch_lines(rows: int, row_elems: int, itemsize: int) -> int:
    """The power-of-two number of cache lines that covers ``rows`` contiguous rows (the GEMV's prefetch
    kernels' NL constexpr)."""
    lines = -(-rows * row_elems * itemsize // LINE_BYTES)
    return 1 << max(lines - 1, 0).bit_length()
