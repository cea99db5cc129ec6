"""Log-linear attention ops and the decode step's fused ops: ``kernels.<op>`` runs Triton on CUDA
tensors and the PyTorch implementation otherwise. This module is the only place that chooses.

Each op has a reference with the same signature: ``naive.py`` is the specification of the attention
ops, ``*_torch.py`` their PyTorch (CPU) paths and the other ops' references, ``*_triton.py``,
``chunk.py`` and ``fused_recurrent.py`` the Triton forms. ``state.py`` (data layout, checks) and
``triton_utils.py`` (device helpers) are leaves. The Triton modules are imported on the first CUDA
call, so ``import fenwick_llm.kernels`` needs neither triton nor a GPU; where triton cannot be
imported, CUDA tensors take the PyTorch path too.
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import torch

from . import (
    bitmask_torch,
    chunk_torch,
    fused_recurrent_torch,
    gemv_torch,
    mixer_torch,
    naive,
    norm_torch,
    window_torch,
)
from .chunk_plan import ChunkPlan
from .state import FenwickState, PooledState, WindowRows, max_positions, num_levels_for

__all__ = [
    "FenwickState",
    "PooledState",
    "add_rmsnorm",
    "apply_token_bitmask_",
    "chunk_log_linear_attn",
    "fused_recurrent_step",
    "gated_rmsnorm",
    "has_triton",
    "linear_residual",
    "max_positions",
    "mixer_decode_inputs",
    "mixer_prefill_inputs",
    "naive",
    "num_levels_for",
    "rmsnorm_linear",
    "rmsnorm_linear_silu_mul",
    "silu_mul",
    "window_step",
    "write_window",
]


@cache
def _triton() -> SimpleNamespace | None:
    """The Triton modules, imported once; None where triton cannot be imported."""
    try:
        from . import (
            bitmask_triton,
            chunk,
            fused_recurrent,
            gemv_triton,
            mixer_triton,
            norm_triton,
            window_triton,
        )
    except ImportError:
        return None
    return SimpleNamespace(chunk=chunk, step=fused_recurrent, gemv=gemv_triton, mixer=mixer_triton,
                           norm=norm_triton, window=window_triton, bitmask=bitmask_triton)


def _gpu(x: torch.Tensor) -> SimpleNamespace | None:
    """The Triton modules for a CUDA tensor, None for a CPU one (or without triton)."""
    return _triton() if x.is_cuda else None


def has_triton() -> bool:
    """Whether CUDA tensors take the Triton kernels (whose launches CUDA graphs can capture)."""
    return _triton() is not None


# ---- attention ------------------------------------------------------------------------------------


def chunk_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          level_scales: torch.Tensor, *, scale: float | None = None,
                          initial_state: FenwickState | PooledState | None = None,
                          output_final_state: bool = False, cu_seqlens: torch.Tensor | None = None,
                          final_into: tuple[torch.Tensor, torch.Tensor] | None = None,
                          plan: ChunkPlan | None = None) -> tuple[torch.Tensor, FenwickState | None]:
    """Prefill. Shapes in ``chunk.chunk_log_linear_attn`` (``naive.recurrent_log_linear_attn`` is the
    specification); ``final_into`` (pool, slots) writes the final levels into pool[slots] instead of
    returning them; ``plan`` (chunk_plan.py), the Triton path's plan of these sequences, built once for
    the layers of a model pass (the PyTorch path plans on the host and ignores it)."""
    kw = dict(scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, final_into=final_into)
    tri = _gpu(q)
    if tri:
        return tri.chunk.chunk_log_linear_attn(q, k, v, g, level_scales, plan=plan, **kw)
    return chunk_torch.chunk_log_linear_attn(q, k, v, g, level_scales, **kw)


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float | None = None, *,
                         level_decay: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token for N sequences; shapes and ``level_decay`` (a pool that defers the decay) in
    ``naive.fused_recurrent_step_ref``."""
    tri = _gpu(q)
    impl = tri.step.fused_recurrent_step if tri else fused_recurrent_torch.fused_recurrent_step
    return impl(q, k, v, g, level_scales, levels, slots, positions, scale, level_decay=level_decay)


def window_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                level_scales: torch.Tensor, levels: torch.Tensor, level_decay: torch.Tensor,
                window: tuple[torch.Tensor, ...], slots: torch.Tensor, positions: torch.Tensor,
                scale: float | None = None) -> torch.Tensor:
    """One decode token on a pool whose low levels are a token window (``state.py``); the reference is
    ``window_torch.fused_recurrent_step_window_ref``."""
    tri = _gpu(q)
    impl = tri.window.window_step if tri else window_torch.fused_recurrent_step_window
    return impl(q, k, v, g, level_scales, levels, level_decay, window, slots, positions, scale)


def write_window(window: tuple[torch.Tensor, ...], rows: WindowRows, k: torch.Tensor, v: torch.Tensor,
                 g: torch.Tensor) -> None:
    """After a prefill: each sequence's last block into its token window
    (``window_torch.write_window_ref``)."""
    tri = _gpu(k)
    impl = tri.window.write_window_triton if tri else window_torch.write_window_ref
    impl(window, rows, k, v, g)


# ---- the mixer's inputs ---------------------------------------------------------------------------


def mixer_decode_inputs(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                        conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                        A_log: torch.Tensor, *, intermediate_size: int, n_groups: int, state_size: int,
                        num_heads: int, head_dim: int, lambda_levels: int, lambda_mode: str,
                        lambda_L: torch.Tensor | None = None, fc1_w: torch.Tensor | None = None,
                        fc1_b: torch.Tensor | None = None, fc2_w: torch.Tensor | None = None,
                        fc2_b: torch.Tensor | None = None) -> mixer_torch.Outputs:
    """Conv step, Δ, g and λ of one token per row (``mixer_torch.mixer_decode_inputs_ref``)."""
    tri = _gpu(proj)
    impl = tri.mixer.mixer_decode_inputs_triton if tri else mixer_torch.mixer_decode_inputs_ref
    return impl(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log,
                intermediate_size=intermediate_size, n_groups=n_groups, state_size=state_size,
                num_heads=num_heads, head_dim=head_dim, lambda_levels=lambda_levels, lambda_mode=lambda_mode,
                lambda_L=lambda_L, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)


def mixer_prefill_inputs(proj: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                         slots: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                         dt_bias: torch.Tensor, A_log: torch.Tensor, *, intermediate_size: int, n_groups: int,
                         state_size: int, num_heads: int, head_dim: int, lambda_levels: int, lambda_mode: str,
                         lambda_L: torch.Tensor | None = None, fc1_w: torch.Tensor | None = None,
                         fc1_b: torch.Tensor | None = None, fc2_w: torch.Tensor | None = None,
                         fc2_b: torch.Tensor | None = None) -> mixer_torch.Outputs:
    """Conv, Δ, g and λ of packed sequences (``mixer_torch.mixer_prefill_inputs_ref``)."""
    tri = _gpu(proj)
    impl = tri.mixer.mixer_prefill_inputs_triton if tri else mixer_torch.mixer_prefill_inputs_ref
    return impl(proj, cu_seqlens, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log,
                intermediate_size=intermediate_size, n_groups=n_groups, state_size=state_size,
                num_heads=num_heads, head_dim=head_dim, lambda_levels=lambda_levels, lambda_mode=lambda_mode,
                lambda_L=lambda_L, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)


# ---- norms and small-batch dense layers -----------------------------------------------------------


def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm (``norm_torch.add_rmsnorm_ref``)."""
    tri = _gpu(x)
    impl = tri.norm.add_rmsnorm_triton if tri else norm_torch.add_rmsnorm_ref
    return impl(x, residual, weight, eps, out_dtype=out_dtype)


def gated_rmsnorm(o: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                  weight: torch.Tensor | None, eps: float, group_size: int, norm_before_gate: bool,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """D skip + gated RMSNorm of the mixer's output (``norm_torch.gated_rmsnorm_ref``)."""
    tri = _gpu(o)
    impl = tri.norm.gated_rmsnorm_triton if tri else norm_torch.gated_rmsnorm_ref
    return impl(o, x, D, z, weight, eps, group_size, norm_before_gate, out_dtype)


def silu_mul(gate_up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """silu(gate) * up (``norm_torch.silu_mul_ref``)."""
    tri = _gpu(gate_up)
    impl = tri.norm.silu_mul_triton if tri else norm_torch.silu_mul_ref
    return impl(gate_up, out_dtype)


def _gemv(x: torch.Tensor) -> SimpleNamespace | None:
    """The Triton GEMVs for 1..MAX_ROWS rows on CUDA; more rows go to cuBLAS through the references."""
    tri = _gpu(x)
    return tri if tri and 1 <= x.shape[0] <= tri.gemv.MAX_ROWS else None


def rmsnorm_linear(h: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                   weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm + bias-free linear (``gemv_torch.rmsnorm_linear_ref``)."""
    tri = _gemv(h)
    impl = tri.gemv.rmsnorm_linear_triton if tri else gemv_torch.rmsnorm_linear_ref
    return impl(h, norm_weight, eps, weight)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Bias-free linear + residual add (``gemv_torch.linear_residual_ref``)."""
    tri = _gemv(x)
    impl = tri.gemv.linear_residual_triton if tri else gemv_torch.linear_residual_ref
    return impl(x, weight, residual)


def rmsnorm_linear_silu_mul(h: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                            weight_gate_up: torch.Tensor) -> torch.Tensor:
    """RMSNorm + [gate; up] + SiLU-mul (``gemv_torch.rmsnorm_linear_silu_mul_ref``)."""
    tri = _gemv(h)
    impl = tri.gemv.rmsnorm_linear_silu_mul_triton if tri else gemv_torch.rmsnorm_linear_silu_mul_ref
    return impl(h, norm_weight, eps, weight_gate_up)


# ---- sampling -------------------------------------------------------------------------------------


def apply_token_bitmask_(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """-inf, in place, on the logits a grammar's token bitmask forbids
    (``bitmask_torch.apply_token_bitmask_ref``)."""
    tri = _gpu(logits)
    impl = tri.bitmask.apply_token_bitmask_triton if tri else bitmask_torch.apply_token_bitmask_ref
    impl(logits, bitmask, rows)
