"""Triton kernels between a prefill and the engine's state pool (references: kernels/pool_state.py,
kernels/window.py).

``pooled_merged_levels``: the initial state of continuing sequences, straight from the pool, in the
chunk kernel's form (merged for the first query, and summed over levels). One program per (sequence,
head, V block) walks the levels once: a stored block times its owed decay, or, for levels 0..BW of a
windowed pool, the window's rows of that level as one [K, W] x [W, BV] product.

``write_window_triton``: after a prefill, each sequence's last block of k, v and in-block log-decay into
its token window; one program per (sequence, column block), the log-decay as one cumulative sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .chunk import _bitlen, log2_pow2
from .pool_state import PooledState
from .window import BW, W, WindowRows, check_pool_levels


@triton.jit
def _pooled_merged_kernel(
    levels, decay, win_k, win_v, win_g, slots, positions, merged, cum,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, HAS_WINDOW: tl.constexpr,
    BWL: tl.constexpr, WN: tl.constexpr, LO: tl.constexpr,
):
    """levels [P, L - LO, H, K, V]: the pool holds levels LO..L-1 (LO = BW + 1 with a window, else 0)."""
    i_hv, i_n = tl.program_id(0), tl.program_id(1)
    i_h, i_v = i_hv // NV, i_hv % NV
    i_g = i_h // (H // G)
    i_s = tl.load(slots + i_n).to(tl.int64)
    t = tl.load(positions + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    z = tl.where(t > 0, log2_pow2(tl.maximum(t & -t, 1)), -1)  # ctz(t): levels 0..z merge into z + 1
    p_blk = levels + ((i_s * (L - LO)) * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :]
    p_a = decay + (i_s * 2 + t % 2) * (L * H) + i_h
    p_out = ((i_n * L) * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :]
    if HAS_WINDOW:  # the block of the last token t - 1: rows 0..nrow-1 of buffer block % 2
        o_w = tl.arange(0, WN)
        last = tl.maximum(t - 1, 0)
        block = last >> BWL
        nrow = tl.where(t > 0, t - (block << BWL), 0)
        buf = block & 1
        m_w = o_w < nrow
        b_wk = tl.load(win_k + ((i_s * 2 + buf) * WN + o_w[:, None]) * (G * K) + i_g * K + o_k[None, :],
                       mask=m_w[:, None] & (o_k < K)[None, :], other=0.0).to(tl.float32)
        b_wv = tl.load(win_v + ((i_s * 2 + buf) * WN + o_w[:, None]) * (H * V) + i_h * V + o_v[None, :],
                       mask=m_w[:, None] & (o_v < V)[None, :], other=0.0).to(tl.float32)
        p_wg = win_g + (i_s * 2 + buf) * (WN * H) + i_h
        b_wg = tl.load(p_wg + o_w * H, mask=m_w, other=0.0)
        g_last = tl.load(p_wg + tl.maximum(nrow - 1, 0) * H)
        b_w = tl.where(m_w, tl.exp(g_last - b_wg), 0.0)
        s_w = (block << BWL) + o_w
        lev = tl.where(s_w == last, 0, _bitlen(last ^ s_w, BWL))  # (WN,)
    b_carry = tl.zeros([BK, BV], dtype=tl.float32)
    b_cum = tl.zeros([BK, BV], dtype=tl.float32)
    for l in tl.static_range(L):
        if HAS_WINDOW and l <= BWL:
            b_kw = b_wk * tl.where(lev == l, b_w, 0.0)[:, None]
            b_s = tl.dot(tl.trans(b_kw), b_wv, input_precision="ieee")
        else:
            b_e = tl.exp(tl.load(p_a + l * H))  # 0 for an empty level, whatever its block holds
            b_blk = tl.load(p_blk + (l - LO) * (H * K * V), mask=m_kv, other=0.0).to(tl.float32)
            b_s = tl.where(b_e > 0, b_blk * b_e, 0.0)
        if l <= z:
            b_carry += b_s
            b_m = tl.zeros([BK, BV], dtype=tl.float32)
        elif l == z + 1:
            b_m = b_s + b_carry
        else:
            b_m = b_s
        b_cum += b_m
        tl.store(merged + p_out + l * (H * K * V), b_m, mask=m_kv)
        tl.store(cum + p_out + l * (H * K * V), b_cum, mask=m_kv)
    if z >= L - 1:  # a carry past the top level lands in it (positions beyond the pool's capacity)
        tl.store(merged + p_out + (L - 1) * (H * K * V), b_carry, mask=m_kv)
        tl.store(cum + p_out + (L - 1) * (H * K * V), b_carry, mask=m_kv)


def pooled_merged_levels(state: PooledState, block_v: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``kernels.pool_state.merged_levels_ref`` in one launch. Pool tensors contiguous."""
    levels, decay = state.levels, state.decay
    P, _, H, K, V = levels.shape
    L = decay.shape[2]
    window = state.window
    low = check_pool_levels(levels, L, window)
    for t in (levels, decay, *(window or ())):
        if not t.is_contiguous():
            raise ValueError("pooled_merged_levels needs contiguous pool tensors")
    G = window[0].shape[-2] if window is not None else 1
    N = state.num_seqs
    merged = torch.empty(N, L, H, K, V, dtype=torch.float32, device=levels.device)
    cum = torch.empty_like(merged)
    if N == 0:
        return merged, cum
    BV = min(max(16, triton.next_power_of_2(V)), block_v)
    NV = triton.cdiv(V, BV)
    dummy = decay
    win_k, win_v, win_g = window if window is not None else (dummy, dummy, dummy)
    _pooled_merged_kernel[(H * NV, N)](
        levels, decay, win_k, win_v, win_g, state.slots, state.positions, merged, cum,
        H=H, G=G, K=K, V=V, L=L, BK=max(16, triton.next_power_of_2(K)), BV=BV, NV=NV,
        HAS_WINDOW=window is not None, BWL=BW, WN=W, LO=low, num_warps=4,
    )
    return merged, cum


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
    """``kernels.window.write_window_ref`` in one launch (window tensors contiguous)."""
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
        k, v, g, win_k, win_v, win_g, rows.seq_slot, rows.seq_buf, rows.first, rows.seq_count, rows.seq_src,
        k.stride(0), v.stride(0), g.stride(0),
        GK=G * K, HV=H * V, H=H, BGK=triton.next_power_of_2(G * K), BH=max(2, triton.next_power_of_2(H)),
        BC=BC, WN=W, num_warps=4,
    )
