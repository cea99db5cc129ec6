"""Triton device helpers shared by the kernels: bit arithmetic, products, softplus, the PDL wait and
L2 prefetch (``pdl.py`` has the host side), and the decode step's per-program inputs.

A leaf: it imports triton only.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bitlen(x, NBITS: tl.constexpr):
    """bitlen(x) for 0 <= x < 2^NBITS, elementwise; bitlen(0) = 0."""
    n = tl.zeros_like(x)
    for b in tl.static_range(NBITS):
        n += ((x >> b) > 0).to(n.dtype)
    return n


@triton.jit
def bitlen_fast(x, NBITS: tl.constexpr):
    """``bitlen`` from the exponent of float(2x + 1): exact while 2^(NBITS+1) <= 2^24."""
    tl.static_assert(NBITS <= 22)
    xs = tl.minimum(x, (1 << NBITS) - 1).to(tl.int32)
    return (((2 * xs + 1).to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127).to(x.dtype)


@triton.jit
def log2_pow2(x):
    """log2(x) for a power of two x (a scalar), exact: the exponent of float(x)."""
    return (x.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127


@triton.jit
def popcount(x, NBITS: tl.constexpr):
    """Set bits of a scalar 0 <= x < 2^NBITS."""
    n = x * 0
    for b in tl.static_range(NBITS):
        n += (x >> b) & 1
    return n


@triton.jit
def dot(a, b, DT: tl.constexpr, PREC: tl.constexpr):
    """a @ b on operands cast to DT, accumulated in fp32."""
    return tl.dot(a.to(DT), b.to(DT), input_precision=PREC)


@triton.jit
def softplus(x):
    # torch's softplus (beta 1, threshold 20) as max(x, 0) + log1p(exp(-|x|)), with log1p(u) by its
    # atanh series in s = u / (2 + u) <= 1/3 (truncated: < 2e-8 relative) instead of tl.log, which
    # may be a fast approximation on the device
    u = tl.exp(-tl.abs(x))
    s = u / (2.0 + u)
    s2 = s * s
    p = 1.0 / 11 + s2 / 13
    p = 1.0 / 9 + s2 * p
    p = 1.0 / 7 + s2 * p
    p = 1.0 / 5 + s2 * p
    p = 1.0 / 3 + s2 * p
    p = 1.0 + s2 * p
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * p)


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the lines at ptrs: no register written, nothing waited for, never a fault that matters
    (a hint). Used before ``gdc_wait`` on data the previous kernel does not write."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr):
    """With USE_PDL: wait until the previous kernel has finished (its writes are visible after this), then
    let the next kernel launch. Reads of the previous kernel's output go after this call; reads of data
    written two or more launches back may go before it. Without PDL: nothing."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def token_inputs(q, k, v, g, i_n, i_g, i_h, o_k, o_v, m_k, m_v, s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn):
    """This token's q and k rows (group i_g), v (head i_h, columns o_v) in fp32, and exp(g)."""
    b_q = tl.load(q + i_n * s_qn + i_g * s_qg + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_n * s_kn + i_g * s_kg + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_n * s_vn + i_h * s_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
    return b_q, b_k, b_v, tl.exp(tl.load(g + i_n * s_gn + i_h).to(tl.float32))


@triton.jit
def program_row(slots, positions, H: tl.constexpr, G: tl.constexpr, NV: tl.constexpr,
                 USE_PDL: tl.constexpr):
    """A step program's (request, head, V block) from its ids, the head's group, its slot and position;
    USE_PDL: after waiting for the previous kernel (kernels.pdl), whose writes are visible then."""
    wait_then_release(USE_PDL)
    return program_ids(slots, positions, H, G, NV)


@triton.jit
def program_ids(slots, positions, H: tl.constexpr, G: tl.constexpr, NV: tl.constexpr):
    """``program_row`` without the wait: the slots and positions are written before a step's first
    kernel, so a kernel later in the step may read them before its PDL wait."""
    i_hv, i_n = tl.program_id(0), tl.program_id(1)
    i_h, i_v = i_hv // NV, i_hv % NV
    i_s = tl.load(slots + i_n).to(tl.int64)
    return i_n, i_h, i_v, i_h // (H // G), i_s, tl.load(positions + i_n).to(tl.int64)
