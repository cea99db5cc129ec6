"""Fused element-wise ops of one decode step in PyTorch: add + RMSNorm, gated RMSNorm, and SiLU-mul.

The specification and the CPU path of ``norm_triton.py``, bit-identical to the model's code in
engine/mixer.py and engine/model.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import mul_to, rms_norm


def add_rmsnorm_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add, then RMSNorm of the sum.

    Args:
        x, residual: [N, D] (residual may be None: h = x); weight: [D] float32.
    Returns:
        (normed [N, D] in ``out_dtype`` (default x.dtype), h = x + residual [N, D] in x.dtype). The sum
        is taken in float32 and rounded to x.dtype before the norm reads it.
    """
    h = x
    if residual is not None:  # the sum in float32 (the promoted type), stored in x.dtype
        h = torch.add(x, residual, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return rms_norm(h, weight, eps, h.shape[-1], out_dtype or x.dtype), h


def gated_rmsnorm_ref(o: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                      weight: torch.Tensor | None, eps: float, group_size: int, norm_before_gate: bool,
                      out_dtype: torch.dtype) -> torch.Tensor:
    """The mixer's output gate before out_proj: y = o + x * D, normed and gated by silu(z).

    Args:
        o: [N, H, V] any float dtype (the attention's read-out); x: [N, H, V];
        D: [H] or [H * V] float32;
        z: [N, I] with I = H * V (last dim unit-stride); weight: [I] float32, or None for no norm
        (y * silu(z)); group_size: channels per norm group along I; norm_before_gate:
        norm(y) * silu(z) instead of norm(y * silu(z)).
    Returns:
        [N, I] in ``out_dtype``; float32 throughout, one rounding at the end.
    """
    H, V = o.shape[-2:]
    D = D.view(H, V) if D.numel() == H * V else D[:, None]
    y = torch.addcmul(o, x, D).flatten(-2)  # (N, I) float32
    gate = F.silu(z.float())
    if weight is None:
        return mul_to(y, gate, out_dtype)
    if norm_before_gate:
        return mul_to(rms_norm(y, weight, eps, group_size, torch.float32), gate, out_dtype)
    return rms_norm(y * gate, weight, eps, group_size, out_dtype)


def silu_mul_ref(gate_up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """SwiGLU's middle: gate_up [N, 2 * I] = [gate | up] -> silu(gate) * up: [N, I] in ``out_dtype``
    (default gate_up.dtype), silu in float32 and one rounding."""
    gate, up = gate_up.chunk(2, dim=-1)
    return mul_to(F.silu(gate.float()), up, out_dtype or gate_up.dtype)
