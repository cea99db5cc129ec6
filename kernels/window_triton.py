"""The token window in Triton (layout in ``state.py``, references in ``window_torch.py``).

``window_step``: the decode step on a windowed pool.

One program per (request, head, V block). The query reads its block's earlier rows from the window (a
[W, K] and a [W, BV] tile), its own token, and the live levels above BW one after the other; it stores
one row of the window and, at a block's first token, the fold of the finished block (one [K, W] x
[W, BV] product) and of the levels BW + 1..z as level z + 1. Same contract as
``window_torch.fused_recurrent_step_window``.

``write_window_triton``: after a prefill, each sequence's last block of k, v and in-block log-decay into
its token window; one program per (sequence, column block), the log-decay as one cumulative sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .ops import unit_last
from .state import BW, W, WindowRows, check_pool_levels, check_shapes
from .triton_utils import bitlen, log2_pow2, program_ids, token_inputs, wait_then_release

# With PDL, batches of up to PREWAIT_MAX_ROWS read the window rows before waiting for the previous kernel
# (faster at batch 1, slower at batch 32: docs/kernels-notes.md)
PREWAIT_MAX_ROWS = 4


@triton.jit
def _window_step_kernel(
    q, k, v, g, lam, levels, decay, win_k, win_v, win_g, slots, positions, o,
    s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn, s_ln, s_lh, s_on, s_oh, s_sp, s_sl, s_sh,
    scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, BWL: tl.constexpr, WN: tl.constexpr,
    USE_PDL: tl.constexpr, PREWAIT: tl.constexpr,
):
    # USE_PDL (kernels.pdl) and PREWAIT: the slot, the position and this block's earlier window rows
    # (this kernel's own state, from earlier steps; read past L1) load before the wait; the token's
    # inputs after it
    wait_then_release(USE_PDL and not PREWAIT)
    i_n, i_h, i_v, i_g, i_s, t = program_ids(slots, positions, H, G, NV)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_w = tl.arange(0, WN)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]

    # the window buffers of this slot: [2, WN, G, K], [2, WN, H, V], [2, WN, H] (contiguous)
    block, row = t >> BWL, t & (WN - 1)
    buf = block & 1
    p_wk = win_k + i_s * (2 * WN * G * K) + i_g * K
    p_wv = win_v + i_s * (2 * WN * H * V) + i_h * V
    p_wg = win_g + i_s * (2 * WN * H) + i_h

    # this block's earlier rows, then the token itself (level 0)
    m_w = o_w < row
    b_wk = tl.load(p_wk + buf * (WN * G * K) + o_w[:, None] * (G * K) + o_k[None, :],
                   mask=m_w[:, None] & m_k[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
    b_wv = tl.load(p_wv + buf * (WN * H * V) + o_w[:, None] * (H * V) + o_v[None, :],
                   mask=m_w[:, None] & m_v[None, :], other=0.0, cache_modifier=".cg").to(tl.float32)
    b_wg = tl.load(p_wg + buf * (WN * H) + o_w * H, mask=m_w, other=0.0, cache_modifier=".cg")
    g_prev = tl.load(p_wg + buf * (WN * H) + tl.maximum(row - 1, 0) * H, cache_modifier=".cg")
    wait_then_release(USE_PDL and PREWAIT)
    b_q, b_k, b_v, b_decay = token_inputs(q, k, v, g, i_n, i_g, i_h, o_k, o_v, m_k, m_v,
                                           s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn)
    b_g = tl.load(g + i_n * s_gn + i_h).to(tl.float32)
    p_lam = lam + i_n * s_ln + i_h * s_lh
    g_t = tl.where(row > 0, g_prev + b_g, 0.0)
    lev = bitlen(t ^ ((block << BWL) + o_w), BWL)
    b_lr = tl.load(p_lam + lev, mask=m_w, other=0.0).to(tl.float32)
    b_wt = tl.where(m_w, b_lr * tl.exp(g_t - b_wg), 0.0)
    b_sc = tl.sum(b_wk * b_q[None, :], axis=1) * b_wt  # (WN,)
    b_o = tl.sum(b_sc[:, None] * b_wv, axis=0)
    b_o += tl.load(p_lam).to(tl.float32) * tl.sum(b_q * b_k, axis=0) * b_v

    # a block's first token: the finished block (the other buffer, all WN rows, as S at t) and the
    # levels BWL+1..z fold into level z + 1
    fold = (row == 0) & (t > 0)
    z = log2_pow2(tl.maximum(t & -t, 1))
    # the pool stores levels BWL+1.. only: block l - BWL - 1 of the slot is level l
    p_s = levels + i_s * s_sp - (BWL + 1) * s_sl + i_h * s_sh + o_k[:, None] * V + o_v[None, :]
    p_old = decay + (i_s * 2 * L) * H + (t % 2) * (L * H) + i_h
    p_new = decay + (i_s * 2 * L) * H + (1 - t % 2) * (L * H) + i_h
    b_carry = tl.zeros([BK, BV], dtype=tl.float32)
    if fold:
        ob = 1 - buf
        b_fk = tl.load(p_wk + ob * (WN * G * K) + o_w[:, None] * (G * K) + o_k[None, :],
                       mask=m_k[None, :], other=0.0).to(tl.float32)
        b_fv = tl.load(p_wv + ob * (WN * H * V) + o_w[:, None] * (H * V) + o_v[None, :],
                       mask=m_v[None, :], other=0.0).to(tl.float32)
        b_fg = tl.load(p_wg + ob * (WN * H) + o_w * H)
        b_last = tl.load(p_wg + ob * (WN * H) + (WN - 1) * H)
        b_fk = b_fk * tl.exp(b_last - b_fg)[:, None]
        b_carry += tl.dot(tl.trans(b_fk), b_fv, input_precision="ieee")
    for l in range(BWL + 1, L):
        b_a = tl.full((), float("-inf"), tl.float32)
        if fold & (l <= z):
            b_w = tl.exp(tl.load(p_old + l * H))
            b_carry += tl.load(p_s + l * s_sl, mask=m_kv, other=0.0).to(tl.float32) * b_w
        elif fold & (l == z + 1):
            tl.store(p_s + l * s_sl, b_carry.to(p_s.dtype.element_ty), mask=m_kv)
            b_a = b_g
            b_o += tl.load(p_lam + l).to(tl.float32) * tl.exp(b_a) * tl.sum(b_q[:, None] * b_carry, axis=0)
        elif ((t >> (l - 1)) & 1) == 1:
            b_a = tl.load(p_old + l * H) + b_g
            b_s = tl.load(p_s + l * s_sl, mask=m_kv, other=0.0).to(tl.float32)
            b_o += tl.load(p_lam + l).to(tl.float32) * tl.exp(b_a) * tl.sum(b_q[:, None] * b_s, axis=0)
        tl.store(p_new + l * H, b_a)

    # the token becomes its block's row `row` (k by the group's first head, g by the first V block)
    if (i_v == 0) & (i_h % (H // G) == 0):
        tl.store(p_wk + buf * (WN * G * K) + row * (G * K) + o_k, b_k.to(win_k.dtype.element_ty), mask=m_k)
    tl.store(p_wv + buf * (WN * H * V) + row * (H * V) + o_v, b_v.to(win_v.dtype.element_ty), mask=m_v)
    if i_v == 0:
        tl.store(p_wg + buf * (WN * H) + row * H, g_t)
    tl.store(o + i_n * s_on + i_h * s_oh + o_v, (b_o * scale).to(o.dtype.element_ty), mask=m_v)


def window_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                level_scales: torch.Tensor, levels: torch.Tensor, level_decay: torch.Tensor,
                window: tuple[torch.Tensor, ...], slots: torch.Tensor, positions: torch.Tensor,
                scale: float | None = None, block_v: int = 16) -> torch.Tensor:
    """``window_torch.fused_recurrent_step_window`` in one launch; window tensors contiguous. With PDL
    (kernels.pdl) and up to PREWAIT_MAX_ROWS rows, slots, positions and the window are read before the
    wait: the kernel launched just before this one must not write them."""
    check_shapes(q, k, v, g, level_scales)
    N, G, K = q.shape
    H, V = v.shape[-2:]
    L = level_scales.shape[-1]
    win_k, win_v, win_g = window
    check_pool_levels(levels, L, window)
    for t in (levels, level_decay, win_k, win_v, win_g):
        if not t.is_contiguous():
            raise ValueError("window_step needs contiguous levels, level_decay and window tensors")
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, level_scales = (unit_last(x) for x in (q, k, v, g, level_scales))
    o = torch.empty(N, H, V, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    BV = min(max(16, triton.next_power_of_2(V)), block_v)
    NV = triton.cdiv(V, BV)
    _window_step_kernel[(H * NV, N)](
        q, k, v, g, level_scales, levels, level_decay, win_k, win_v, win_g, slots, positions, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        level_scales.stride(0), level_scales.stride(1), o.stride(0), o.stride(1),
        levels.stride(0), levels.stride(1), levels.stride(2),
        scale, H=H, G=G, K=K, V=V, L=L, BK=max(16, triton.next_power_of_2(K)), BV=BV, NV=NV, BWL=BW, WN=W,
        PREWAIT=N <= PREWAIT_MAX_ROWS, num_warps=4, **pdl.options(o),
    )
    return o


@triton.jit
def _write_window_kernel(
    k, v, g, win_k, win_v, win_g, seq_slot, seq_buf, seq_first, seq_count, seq_src, s_k, s_v, s_g,
    GK: tl.constexpr, HV: tl.constexpr, H: tl.constexpr, BGK: tl.constexpr, BH: tl.constexpr,
    BC: tl.constexpr, WN: tl.constexpr,
):
    """Program (sequence, column block): block 0 writes the rows' k and their in-block log-decay gc,
    block c > 0 the v columns (c - 1) * BC .. c * BC of the same rows."""
    i_n, i_c = tl.program_id(0), tl.program_id(1)
    slot = tl.load(seq_slot + i_n).to(tl.int64)
    buf = tl.load(seq_buf + i_n).to(tl.int64)
    first = tl.load(seq_first + i_n).to(tl.int64)
    count = tl.load(seq_count + i_n).to(tl.int64)
    o_w = tl.arange(0, WN)
    m_w = (o_w >= first) & (o_w < first + count)
    src = tl.load(seq_src + i_n).to(tl.int64) + (o_w - first)  # packed row of window row o_w
    dst = (slot * 2 + buf) * WN + o_w  # window row
    if i_c == 0:
        o_gk = tl.arange(0, BGK)
        m_k = m_w[:, None] & (o_gk < GK)[None, :]
        b_k = tl.load(k + src[:, None] * s_k + o_gk[None, :], mask=m_k, other=0.0)
        tl.store(win_k + dst[:, None] * GK + o_gk[None, :], b_k.to(win_k.dtype.element_ty), mask=m_k)
        o_h = tl.arange(0, BH)
        m_h = o_h < H
        # gc[j] = gc[j - 1] + g[j], from the row before the first written one (0 at a block's row 0)
        b_inc = tl.load(g + src[:, None] * s_g + o_h[None, :], mask=(m_w & (o_w > 0))[:, None] & m_h[None, :],
                        other=0.0).to(tl.float32)
        b_base = tl.load(win_g + ((slot * 2 + buf) * WN + tl.maximum(first - 1, 0)) * H + o_h,
                         mask=m_h, other=0.0)
        b_base = tl.where(first > 0, b_base, 0.0)
        b_gc = b_base[None, :] + tl.cumsum(b_inc, axis=0)
        tl.store(win_g + dst[:, None] * H + o_h[None, :], b_gc, mask=m_w[:, None] & m_h[None, :])
    else:
        o_c = (i_c - 1) * BC + tl.arange(0, BC)
        m_v = m_w[:, None] & (o_c < HV)[None, :]
        b_v = tl.load(v + src[:, None] * s_v + o_c[None, :], mask=m_v, other=0.0)
        tl.store(win_v + dst[:, None] * HV + o_c[None, :], b_v.to(win_v.dtype.element_ty), mask=m_v)


def write_window_triton(window: tuple[torch.Tensor, ...], rows: WindowRows, k: torch.Tensor,
                        v: torch.Tensor, g: torch.Tensor, block_cols: int = 256) -> None:
    """``window_torch.write_window_ref`` in one launch (window tensors contiguous)."""
    win_k, win_v, win_g = window
    if not all(t.is_contiguous() for t in window):
        raise ValueError("write_window needs contiguous window tensors")
    _, G, K = k.shape
    H, V = v.shape[1:]
    k, v, g = (x if x.stride(-1) == 1 else x.contiguous() for x in (k.flatten(1), v.flatten(1), g))
    N = rows.first.numel()
    if N == 0:
        return
    BC = min(block_cols, triton.next_power_of_2(H * V))
    _write_window_kernel[(N, 1 + triton.cdiv(H * V, BC))](
        k, v, g, win_k, win_v, win_g, rows.slot, rows.buf, rows.first, rows.count, rows.src,
        k.stride(0), v.stride(0), g.stride(0),
        GK=G * K, HV=H * V, H=H, BGK=triton.next_power_of_2(G * K), BH=max(2, triton.next_power_of_2(H)),
        BC=BC, WN=W, num_warps=4,
    )
