"""Log-linear attention ops. ``kernels.<op>`` runs Triton on CUDA tensors and PyTorch otherwise."""

from __future__ import annotations

import torch

from kernels import naive
from kernels.state import FenwickState, max_positions, num_levels_for

__all__ = [
    "FenwickState",
    "chunk_log_linear_attn",
    "fused_recurrent_step",
    "max_positions",
    "naive",
    "num_levels_for",
]


def chunk_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          level_scales: torch.Tensor, *, scale: float | None = None,
                          initial_state: FenwickState | None = None, output_final_state: bool = False,
                          cu_seqlens: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, FenwickState | None]:
    """Prefill. See ``kernels.naive.recurrent_log_linear_attn`` for shapes."""
    impl = naive.recurrent_log_linear_attn
    return impl(q, k, v, g, level_scales, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """One decode token for N sequences. See ``kernels.naive.fused_recurrent_step_ref`` for shapes."""
    return naive.fused_recurrent_step_ref(q, k, v, g, level_scales, levels, slots, positions, scale)
