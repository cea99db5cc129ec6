"""Small tensor helpers shared by the kernels' PyTorch references, their launchers and the model."""

from __future__ import annotations

import torch


def mul_to(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(a * b).to(dtype)`` in one kernel: the product is taken in the promoted dtype of a and b and
    rounded to ``dtype`` as it is stored, instead of a multiply followed by a separate cast (out= has no
    autograd, so a product that needs a gradient takes the two ops)."""
    if torch.result_type(a, b) == dtype:
        return a * b
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return (a * b).to(dtype)
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=dtype, device=a.device)
    return torch.mul(a, b, out=out)


def unit_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (what the Triton launchers index), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, group_size: int,
             dtype: torch.dtype) -> torch.Tensor:
    """RMSNorm in float32 over groups of ``group_size`` channels of the last dim; the weight multiply
    rounds to ``dtype`` (the model's ``RMSNorm`` and every reference of the fused norms)."""
    xf = x.float().unflatten(-1, (-1, group_size))  # (..., groups, group_size)
    xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    return mul_to(xf.flatten(-2), weight, dtype)
