"""Fused element-wise ops of one decode step in Triton: add + RMSNorm, gated RMSNorm, and SiLU-mul.

The Triton forms of ``norm_torch.py``'s references, with the same signatures. The kernels run one
program per row (per (row, group) for the gated norm), compute in float32, allocate nothing but their
outputs and never synchronise with the host, so that a decode step built from them can be captured in
a CUDA graph. They follow the references' order of operations and roundings; what differs is the
order of the sum of squares and the exp / rsqrt / division (approximate instructions on the GPU), a few
float32 ulps, so 16-bit outputs are equal or, rarely, one ulp apart.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .ops import unit_last
from .triton_utils import wait_then_release


@triton.jit
def _add_rmsnorm_kernel(x, residual, weight, out, h, s_xn, s_rn, s_on, s_hn, eps,
                        D: tl.constexpr, BD: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        USE_PDL: tl.constexpr):
    i_n = tl.program_id(0)
    wait_then_release(USE_PDL)  # kernels.pdl: the previous kernel's writes are visible after the wait
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    b_h = tl.load(x + i_n * s_xn + o_d, mask=m_d, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        b_h += tl.load(residual + i_n * s_rn + o_d, mask=m_d, other=0.0).to(tl.float32)
        b_h = b_h.to(h.dtype.element_ty)
        tl.store(h + i_n * s_hn + o_d, b_h, mask=m_d)
        b_h = b_h.to(tl.float32)
    b_r = tl.rsqrt(tl.sum(b_h * b_h, axis=0) / D + eps)
    b_w = tl.load(weight + o_d, mask=m_d, other=0.0).to(tl.float32)
    tl.store(out + i_n * s_on + o_d, (b_h * b_r * b_w).to(out.dtype.element_ty), mask=m_d)


@triton.jit
def _gated_rmsnorm_kernel(o, x, D, z, weight, y, s_on, s_oh, s_xn, s_xh, s_zn, s_yn, eps,
                          V: tl.constexpr, GS: tl.constexpr,
                          BG: tl.constexpr, D_PER_CHANNEL: tl.constexpr,
                          HAS_WEIGHT: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                          USE_PDL: tl.constexpr):
    i_g, i_n = tl.program_id(0), tl.program_id(1)
    o_g = tl.arange(0, BG)
    m_c = o_g < GS
    o_c = i_g * GS + o_g  # channel along I
    o_h, o_v = o_c // V, o_c % V
    # USE_PDL (kernels.pdl): x and z come from kernels at least two launches back, whose writes are
    # visible once this kernel runs at all (the previous kernel waited for them before letting it start),
    # so they load before the wait, past L1; o, the previous kernel's output, after it
    b_x = tl.load(x + i_n * s_xn + o_h * s_xh + o_v, mask=m_c, other=0.0, cache_modifier=".cg").to(tl.float32)
    b_z = tl.load(z + i_n * s_zn + o_c, mask=m_c, other=0.0, cache_modifier=".cg").to(tl.float32)
    if D_PER_CHANNEL:
        b_D = tl.load(D + o_c, mask=m_c, other=0.0).to(tl.float32)
    else:
        b_D = tl.load(D + o_h, mask=m_c, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        b_w = tl.load(weight + o_c, mask=m_c, other=0.0).to(tl.float32)
    wait_then_release(USE_PDL)
    b_o = tl.load(o + i_n * s_on + o_h * s_oh + o_v, mask=m_c, other=0.0).to(tl.float32)
    b_y = tl.fma(b_x, b_D, b_o)  # one rounding, as torch's addcmul on the CPU
    b_gate = b_z / (1.0 + tl.exp(-b_z))
    if HAS_WEIGHT:
        if NORM_BEFORE_GATE:
            b_y = b_y * tl.rsqrt(tl.sum(b_y * b_y, axis=0) / GS + eps) * b_w * b_gate
        else:
            b_y = b_y * b_gate
            b_y = b_y * tl.rsqrt(tl.sum(b_y * b_y, axis=0) / GS + eps) * b_w
    else:
        b_y = b_y * b_gate
    tl.store(y + i_n * s_yn + o_c, b_y.to(y.dtype.element_ty), mask=m_c)


@triton.jit
def _silu_mul_kernel(gate_up, out, s_gn, s_on, I: tl.constexpr, BI: tl.constexpr):
    i_n = tl.program_id(0)
    o_i = tl.arange(0, BI)
    m_i = o_i < I
    p_g = gate_up + i_n * s_gn + o_i
    b_g = tl.load(p_g, mask=m_i, other=0.0).to(tl.float32)
    b_u = tl.load(p_g + I, mask=m_i, other=0.0).to(tl.float32)
    tl.store(out + i_n * s_on + o_i, (b_g / (1.0 + tl.exp(-b_g)) * b_u).to(out.dtype.element_ty), mask=m_i)


def _block(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _num_warps(block: int) -> int:
    return min(16, max(1, block // 256))


def add_rmsnorm_triton(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                       out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """See ``add_rmsnorm_ref``."""
    N, D = x.shape
    if weight.shape != (D,) or (residual is not None and residual.shape != x.shape):
        r = None if residual is None else tuple(residual.shape)
        raise ValueError(f"add_rmsnorm: x {tuple(x.shape)}, residual {r}, weight {tuple(weight.shape)}")
    x, weight = unit_last(x), weight.contiguous()
    residual = None if residual is None else unit_last(residual)
    out = torch.empty(N, D, dtype=out_dtype or x.dtype, device=x.device)
    h = x if residual is None else torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N:
        BD = _block(D)
        _add_rmsnorm_kernel[(N,)](
            x, residual, weight, out, h, x.stride(0), 0 if residual is None else residual.stride(0),
            out.stride(0), h.stride(0), eps, D=D, BD=BD, HAS_RESIDUAL=residual is not None,
            num_warps=_num_warps(BD), **pdl.options(x),
        )
    return out, h


def gated_rmsnorm_triton(o: torch.Tensor, x: torch.Tensor, D: torch.Tensor, z: torch.Tensor,
                         weight: torch.Tensor | None, eps: float, group_size: int, norm_before_gate: bool,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """See ``gated_rmsnorm_ref``. With PDL (kernels.pdl) x and z are read before the wait: they must not
    be the output of the kernel launched just before this one (o may be)."""
    N, H, V = o.shape
    I = H * V
    if (x.shape != o.shape or z.shape != (N, I) or D.numel() not in (H, I) or I % group_size
            or (weight is not None and weight.shape != (I,))):
        raise ValueError(f"gated_rmsnorm: o {tuple(o.shape)}, x {tuple(x.shape)}, D {tuple(D.shape)}, "
                         f"z {tuple(z.shape)}, weight {None if weight is None else tuple(weight.shape)}, "
                         f"group_size {group_size}")
    o, x, z, D = unit_last(o), unit_last(x), unit_last(z), D.contiguous()
    weight = None if weight is None else weight.contiguous()
    y = torch.empty(N, I, dtype=out_dtype, device=o.device)
    if N:
        BG = _block(group_size)
        _gated_rmsnorm_kernel[(I // group_size, N)](
            o, x, D, z, weight, y, o.stride(0), o.stride(1), x.stride(0), x.stride(1), z.stride(0),
            y.stride(0), eps, V=V, GS=group_size, BG=BG, D_PER_CHANNEL=D.numel() != H,
            HAS_WEIGHT=weight is not None, NORM_BEFORE_GATE=norm_before_gate, num_warps=_num_warps(BG),
            **pdl.options(y),
        )
    return y


def silu_mul_triton(gate_up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """See ``silu_mul_ref``."""
    N, I2 = gate_up.shape
    if I2 % 2:
        raise ValueError(f"silu_mul: gate_up width {I2} is odd")
    gate_up = unit_last(gate_up)
    out = torch.empty(N, I2 // 2, dtype=out_dtype or gate_up.dtype, device=gate_up.device)
    if N:
        BI = _block(I2 // 2)
        _silu_mul_kernel[(N,)](gate_up, out, gate_up.stride(0), out.stride(0), I=I2 // 2, BI=BI,
                                 num_warps=_num_warps(BI))
    return out
