"""The initial state of continuing sequences straight from the engine's pool, in Triton (reference:
``pool_torch.merged_levels_ref``).

``pooled_merged_levels``: the chunk kernel's form of the state (merged for the first query, and summed
over levels). One program per (sequence, head, V block) walks the levels once: a stored block times its
owed decay, or, for levels 0..BW of a windowed pool, the window's rows of that level as one [K, W] x
[W, BV] product. Before it, building the same op by op took ~30 small launches per layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .state import BW, PooledState, W, check_pool_levels
from .triton_utils import bitlen, log2_pow2


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
        lev = tl.where(s_w == last, 0, bitlen(last ^ s_w, BWL))  # (WN,)
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
    """``pool_torch.merged_levels_ref`` in one launch. Pool tensors contiguous."""
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
