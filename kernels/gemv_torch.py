"""Dense layers of a decode step for a few rows, fused with their norm and epilogue: the PyTorch
references (the specification and the CPU path, bit-identical to the model's modules) of
``gemv_triton.py``. Weights are ``nn.Linear.weight`` ([N_out, K], contiguous, model dtype) and there
are no biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import mul_to, rms_norm


def rmsnorm_linear_ref(h: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm, then a bias-free linear layer: ``in_proj(mixer_norm(h))`` or ``lm_head(norm_f(h))``.

    Args:
        h: [M, K] model dtype; norm_weight: [K] float32; weight: [N, K] model dtype.
    Returns:
        y: [M, N] model dtype. The normalised input is rounded to h.dtype before the product, as the
        model does.
    """
    return F.linear(rms_norm(h, norm_weight, eps, h.shape[-1], h.dtype), weight)


def linear_residual_ref(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """A bias-free linear layer added to the residual stream: ``h + out_proj(y)``, ``h + down_proj(a)``.

    Args:
        x: [M, K] model dtype; weight: [N, K] model dtype; residual: [M, N] model dtype.
    Returns:
        residual + x @ weight.T: [M, N] model dtype; the product is rounded to the model dtype, then the
        sum is taken in float32 and rounded once.
    """
    return residual + F.linear(x, weight)


def rmsnorm_linear_silu_mul_ref(h: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                weight_gate_up: torch.Tensor) -> torch.Tensor:
    """RMSNorm, then GatedMLP up to (not including) down_proj: ``silu(gate_proj(xn)) * up_proj(xn)``.

    Args:
        h: [M, K] model dtype; norm_weight: [K] float32;
        weight_gate_up: [2 * I, K] model dtype, ``torch.cat([gate_proj.weight, up_proj.weight])``.
    Returns:
        a: [M, I] model dtype. gate and up are rounded to the model dtype (they are Linear outputs); silu
        and the product are taken in float32 and rounded once, as ``GatedMLP.forward``.
    """
    xn = rms_norm(h, norm_weight, eps, h.shape[-1], h.dtype)
    gate_w, up_w = weight_gate_up.chunk(2, dim=0)  # row blocks of a contiguous weight stay contiguous
    gate, up = F.linear(xn, gate_w), F.linear(xn, up_w)
    return mul_to(F.silu(gate.float()), up, h.dtype)
