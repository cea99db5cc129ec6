"""Log-linear attention ops. ``kernels.<op>`` runs Triton on CUDA tensors and PyTorch otherwise.

The Triton modules are imported on the first CUDA call, so ``import kernels`` needs neither triton nor
a GPU; where they cannot be imported, CUDA tensors take the PyTorch path too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from functools import cache

import torch

from . import naive
from .chunk_torch import chunk_log_linear_attn as chunk_log_linear_attn_torch
from .pool_state import PooledState
from .state import FenwickState, max_positions, num_levels_for
from .step_torch import fused_recurrent_step as fused_recurrent_step_torch

__all__ = [
    "FenwickState",
    "PooledState",
    "chunk_log_linear_attn",
    "chunk_plan_cache",
    "has_triton_prefill",
    "held_chunk_plan",
    "fused_recurrent_step",
    "max_positions",
    "naive",
    "num_levels_for",
]


@cache
def _triton_chunk() -> Callable | None:
    try:
        from .chunk import chunk_log_linear_attn as impl
    except ImportError:
        return None
    return impl


@cache
def _triton_step() -> Callable | None:
    try:
        from .fused_recurrent import fused_recurrent_step as impl
    except ImportError:
        return None
    return impl


def chunk_plan_cache(device: torch.device, known: Sequence[tuple[torch.Tensor, list[int]]] = ()
                     ) -> contextlib.AbstractContextManager:
    """A block in which Triton prefill calls with the very same cu_seqlens / positions tensors (the
    layers of one model pass) share one host plan: built once, not once per layer. known: (device
    tensor, its values) pairs the caller already has on the host, so the plan reads none back. A no-op
    off CUDA or where the Triton prefill is not importable."""
    if device.type != "cuda" or _triton_chunk() is None:
        return contextlib.nullcontext()
    from .chunk import plan_cache
    return plan_cache(known)


def has_triton_prefill() -> bool:
    """Whether CUDA prefill calls take the Triton chunk kernels (whose launches CUDA graphs can capture)."""
    return _triton_chunk() is not None


def held_chunk_plan() -> object | None:
    """The chunk plan built in the current ``chunk_plan_cache`` block (``kernels.chunk.held_plan``), for
    a CUDA graph captured in it to keep alive; None off CUDA or without the Triton prefill."""
    if _triton_chunk() is None:
        return None
    from .chunk import held_plan
    return held_plan()


def chunk_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          level_scales: torch.Tensor, *, scale: float | None = None,
                          initial_state: FenwickState | PooledState | None = None,
                          output_final_state: bool = False,
                          cu_seqlens: torch.Tensor | None = None,
                          final_into: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, FenwickState | None]:
    """Prefill. See ``kernels.naive.recurrent_log_linear_attn`` for shapes; ``final_into`` (pool, slots)
    writes the final levels into pool[slots] instead of returning them (``kernels.chunk``)."""
    impl = (_triton_chunk() if q.is_cuda else None) or chunk_log_linear_attn_torch
    return impl(q, k, v, g, level_scales, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, final_into=final_into)


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float | None = None, *,
                         partials: bool = False, level_decay: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token for N sequences. See ``kernels.naive.fused_recurrent_step_ref`` for shapes and
    ``level_decay`` (a pool that defers the decay: the step stores two blocks instead of every live one).

    partials=True lets the Triton kernel return its float32 read-outs per block of K, [NK, N, H, V],
    unsummed (``kernels.norm.gated_rmsnorm`` sums them); the PyTorch path returns [N, H, V] either way.
    """
    impl = _triton_step() if q.is_cuda else None
    if impl is not None:
        return impl(q, k, v, g, level_scales, levels, slots, positions, scale, partials=partials,
                    level_decay=level_decay)
    return fused_recurrent_step_torch(q, k, v, g, level_scales, levels, slots, positions, scale,
                                      level_decay=level_decay)


@cache
def _triton_window_step() -> Callable | None:
    try:
        from .window_triton import window_step as impl
    except ImportError:
        return None
    return impl


def window_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                level_scales: torch.Tensor, levels: torch.Tensor, level_decay: torch.Tensor,
                window: tuple[torch.Tensor, ...], slots: torch.Tensor, positions: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
    """One decode token on a pool whose low levels are a token window (``kernels.window``)."""
    impl = _triton_window_step() if q.is_cuda else None
    if impl is None:
        from .window import fused_recurrent_step_window as impl
    return impl(q, k, v, g, level_scales, levels, level_decay, window, slots, positions, scale)
