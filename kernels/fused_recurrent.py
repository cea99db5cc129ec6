"""One decode token for N sequences in Triton: the Fenwick recurrence fused into one launch.

Each program owns one (request, head, V-block). With t the token's position and z = ctz(t), it
sums levels 0..z into the carry, zeroes levels 1..z, writes the carry decayed as level z+1, decays
the other live levels in place, writes k vᵀ as level 0 and reads out o = scale * Σ λ_l qᵀ S[l].
Levels that are empty at position t (bit l-1 of t clear, l > z+1) are neither read nor written, so
a step moves about popcount(t) + 1 levels. With a ``level_decay`` pool (the engine's) the decay is
deferred: the live levels above z + 1 are only read, their owed log-decay grows by g, and the step
stores two blocks (level 0 and z + 1). Positions and slots are read on the device: no host
synchronisation and no allocation besides the output, so the step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .chunk import log2_pow2
from .naive import check_shapes
from .ops import unit_last
from .pdl_triton import wait_then_release
from .state import check_level_decay


@triton.jit
def _token_inputs(q, k, v, g, i_n, i_g, i_h, o_k, o_v, m_k, m_v, s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn):
    """This token's q and k rows (group i_g), v (head i_h, columns o_v) in fp32, and exp(g)."""
    b_q = tl.load(q + i_n * s_qn + i_g * s_qg + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_k = tl.load(k + i_n * s_kn + i_g * s_kg + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_v = tl.load(v + i_n * s_vn + i_h * s_vh + o_v, mask=m_v, other=0.0).to(tl.float32)
    return b_q, b_k, b_v, tl.exp(tl.load(g + i_n * s_gn + i_h).to(tl.float32))


@triton.jit
def _program_row(slots, positions, H: tl.constexpr, G: tl.constexpr, NV: tl.constexpr,
                 USE_PDL: tl.constexpr):
    """A step program's (request, head, V block) from its ids, the head's group, its slot and position;
    USE_PDL: after waiting for the previous kernel (kernels.pdl), whose writes are visible then."""
    wait_then_release(USE_PDL)
    return _program_ids(slots, positions, H, G, NV)


@triton.jit
def _program_ids(slots, positions, H: tl.constexpr, G: tl.constexpr, NV: tl.constexpr):
    """``_program_row`` without the wait: the slots and positions are written before a step's first
    kernel, so a kernel later in the step may read them before its PDL wait."""
    i_hv, i_n = tl.program_id(0), tl.program_id(1)
    i_h, i_v = i_hv // NV, i_hv % NV
    i_s = tl.load(slots + i_n).to(tl.int64)
    return i_n, i_h, i_v, i_h // (H // G), i_s, tl.load(positions + i_n).to(tl.int64)


@triton.jit
def _fused_recurrent_step_kernel(
    q, k, v, g, lam, levels, decay, slots, positions, o,
    s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn, s_ln, s_lh, s_on, s_oh, s_sp, s_sl, s_sh,
    scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, DEFER: tl.constexpr, USE_PDL: tl.constexpr,
):
    i_n, i_h, i_v, i_g, i_s, t = _program_row(slots, positions, H, G, NV, USE_PDL)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_q, b_k, b_v, b_decay = _token_inputs(q, k, v, g, i_n, i_g, i_h, o_k, o_v, m_k, m_v,
                                           s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn)
    p_lam = lam + i_n * s_ln + i_h * s_lh
    p_s = levels + i_s * s_sp + i_h * s_sh + o_k[:, None] * V + o_v[None, :]  # level 0 of this head

    if DEFER:
        _deferred_loop(b_q, b_k, b_v, tl.load(g + i_n * s_gn + i_h).to(tl.float32), p_lam, p_s, m_kv,
                       decay + (i_s * 2 * L) * H + i_h, t, o + i_n * s_on + i_h * s_oh + o_v, m_v, scale,
                       s_sl, H, L, BK, BV)
    else:
        b_o = tl.zeros([BV], dtype=tl.float32)
        b_carry = tl.zeros([BK, BV], dtype=tl.float32)
        if t > 0:
            b_carry += tl.load(p_s, mask=m_kv, other=0.0).to(tl.float32)
        for l in range(1, L):
            below = t & ((1 << l) - 1)
            if (t > 0) & (below == 0):
                # l <= z: folded into level z + 1
                b_carry += tl.load(p_s + l * s_sl, mask=m_kv, other=0.0).to(tl.float32)
                b_zero = tl.zeros([BK, BV], dtype=tl.float32)
                tl.store(p_s + l * s_sl, b_zero.to(p_s.dtype.element_ty), mask=m_kv)
            elif ((t >> (l - 1)) & 1) == 1:
                if below == (1 << (l - 1)):
                    b_s = b_carry * b_decay  # l == z + 1: the new block
                else:
                    b_s = tl.load(p_s + l * s_sl, mask=m_kv, other=0.0).to(tl.float32) * b_decay
                tl.store(p_s + l * s_sl, b_s.to(p_s.dtype.element_ty), mask=m_kv)
                b_o += tl.load(p_lam + l).to(tl.float32) * tl.sum(b_q[:, None] * b_s, axis=0)
        tl.store(p_s, (b_k[:, None] * b_v[None, :]).to(p_s.dtype.element_ty), mask=m_kv)
        b_o += tl.load(p_lam).to(tl.float32) * tl.sum(b_q * b_k, axis=0) * b_v
        tl.store(o + i_n * s_on + i_h * s_oh + o_v, (b_o * scale).to(o.dtype.element_ty), mask=m_v)


@triton.jit
def _deferred_loop(b_q, b_k, b_v, b_g, p_lam, p_s, m_kv, p_a, t, p_o, m_v, scale, s_sl,
                   H: tl.constexpr, L: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """The level loop on a pool with deferred decay: S[l] = stored[l] * exp(a[l]), a read from buffer
    t % 2 of the slot's [2, L, H] log-decays (p_a: buffer 0, level 0, this head) and written to the
    other. Live levels above z + 1 are read for the output only; the step stores level 0 (k vᵀ, a = 0)
    and level z + 1 (the carry as summed, a = g); levels 1..z and empty ones get a = -inf."""
    p_old = p_a + (t % 2) * (L * H)
    p_new = p_a + (1 - t % 2) * (L * H)
    b_o = tl.zeros([BV], dtype=tl.float32)
    b_carry = tl.zeros([BK, BV], dtype=tl.float32)
    if t > 0:
        b_carry += tl.load(p_s, mask=m_kv, other=0.0).to(tl.float32) * tl.exp(tl.load(p_old))
    for l in range(1, L):
        below = t & ((1 << l) - 1)
        b_a = tl.full((), float("-inf"), tl.float32)
        if (t > 0) & (below == 0):  # l <= z: folded into level z + 1
            b_w = tl.exp(tl.load(p_old + l * H))
            b_carry += tl.load(p_s + l * s_sl, mask=m_kv, other=0.0).to(tl.float32) * b_w
        elif ((t >> (l - 1)) & 1) == 1:
            if below == (1 << (l - 1)):  # l == z + 1: the new block
                tl.store(p_s + l * s_sl, b_carry.to(p_s.dtype.element_ty), mask=m_kv)
                b_a = b_g
                b_s = b_carry
            else:
                b_a = tl.load(p_old + l * H) + b_g
                b_s = tl.load(p_s + l * s_sl, mask=m_kv, other=0.0).to(tl.float32)
            b_o += tl.load(p_lam + l).to(tl.float32) * tl.exp(b_a) * tl.sum(b_q[:, None] * b_s, axis=0)
        tl.store(p_new + l * H, b_a)
    tl.store(p_s, (b_k[:, None] * b_v[None, :]).to(p_s.dtype.element_ty), mask=m_kv)
    tl.store(p_new, 0.0)
    b_o += tl.load(p_lam).to(tl.float32) * tl.sum(b_q * b_k, axis=0) * b_v
    tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_v)


@triton.jit
def _fused_recurrent_step_tile_kernel(
    q, k, v, g, lam, levels, decay, slots, positions, o,
    s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn, s_ln, s_lh, s_on, s_oh, s_ok, s_sp, s_sl, s_sh,
    scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, LP: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NK: tl.constexpr, NV: tl.constexpr, DEFER: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """The same step with every level of one [BK, BV] tile loaded at once ([LP, BK, BV], dead levels
    masked off): the loads of all live levels are in flight together instead of one level after the
    other. Each program writes a partial read-out over its BK rows of K: o[i_k, n, h, v-block]."""
    wait_then_release(USE_PDL)  # kernels.pdl: the previous kernel's writes are visible after the wait
    i_hkv, i_n = tl.program_id(0), tl.program_id(1)
    i_h = i_hkv // (NK * NV)
    i_k, i_v = (i_hkv // NV) % NK, i_hkv % NV
    i_g = i_h // (H // G)
    i_s = tl.load(slots + i_n).to(tl.int64)
    t = tl.load(positions + i_n).to(tl.int64)

    o_l = tl.arange(0, LP)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_q, b_k, b_v, b_decay = _token_inputs(q, k, v, g, i_n, i_g, i_h, o_k, o_v, m_k, m_v,
                                           s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn)
    b_lam = tl.load(lam + i_n * s_ln + i_h * s_lh + o_l, mask=o_l < L, other=0.0).to(tl.float32)

    # per level: fold (0..z into the carry), new (z + 1), keep (live above z + 1, decays in place)
    z1 = tl.where(t > 0, log2_pow2(t & -t) + 1, 0)  # ctz(t) + 1: first level not folded; 0 at t = 0
    bit = ((t >> tl.maximum(o_l - 1, 0)) & 1) == 1
    fold = (o_l < z1)
    new = (o_l == z1) & (o_l > 0)  # z1 = 0 at position 0: no new level
    keep = (o_l > z1) & bit & (o_l < L)
    l3 = o_l[:, None, None]
    p_s = levels + i_s * s_sp + i_h * s_sh + l3 * s_sl + (o_k[:, None] * V + o_v[None, :])[None, :, :]
    m_read = (fold | keep)[:, None, None] & m_kv[None, :, :]
    b_s = tl.load(p_s, mask=m_read, other=0.0).to(tl.float32)  # (LP, BK, BV)
    b_kv = b_k[:, None] * b_v[None, :]
    if DEFER:
        # S[l] = stored * exp(a[l]); a from buffer t % 2, the new a to the other one (every program of
        # this slot and head writes the same values); only levels 0 and z + 1 are stored
        p_a = decay + (i_s * 2 * L) * H + i_h + o_l * H
        b_ao = tl.load(p_a + (t % 2) * (L * H), mask=fold | keep, other=float("-inf"))
        b_g = tl.load(g + i_n * s_gn + i_h).to(tl.float32)
        b_carry = tl.sum(tl.where(fold[:, None, None], b_s * tl.exp(b_ao)[:, None, None], 0.0), axis=0)
        b_an = tl.where(new, b_g, tl.where(keep, b_ao + b_g, float("-inf")))
        b_an = tl.where(o_l == 0, 0.0, b_an)
        tl.store(p_a + (1 - t % 2) * (L * H), b_an, mask=o_l < L)
        b_s = tl.where(new[:, None, None], b_carry[None, :, :], b_s)
        b_s = tl.where((o_l == 0)[:, None, None], b_kv[None, :, :], b_s)
        m_write = ((o_l == 0) | new)[:, None, None] & m_kv[None, :, :]
        tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_write)
        b_w = tl.where((o_l == 0) | new | keep, b_lam * tl.exp(b_an), 0.0)
    else:
        b_carry = tl.sum(tl.where(fold[:, None, None], b_s, 0.0), axis=0)  # (BK, BV)
        b_s = tl.where(new[:, None, None], b_carry[None, :, :], b_s) * b_decay
        b_s = tl.where(fold[:, None, None], 0.0, b_s)
        b_s = tl.where((o_l == 0)[:, None, None], b_kv[None, :, :], b_s)
        m_write = ((o_l == 0) | fold | new | keep)[:, None, None] & m_kv[None, :, :]
        tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_write)
        b_w = tl.where((o_l == 0) | new | keep, b_lam, 0.0)
    b_t = tl.sum(b_w[:, None, None] * b_s, axis=0)  # (BK, BV) λ-weighted sum of the live levels
    b_o = tl.sum(b_q[:, None] * b_t, axis=0) * scale
    tl.store(o + i_k * s_ok + i_n * s_on + i_h * s_oh + o_v, b_o, mask=m_v)


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float | None = None, *, partials: bool = False,
                         level_decay: torch.Tensor | None = None, tile: bool | None = None,
                         block_k: int | None = None, block_v: int | None = None,
                         num_warps: int | None = None) -> torch.Tensor:
    """One decode token for N sequences held in a pool; updates ``levels[slots]`` in place.

    Args:
        q, k: [N, G, K]; v: [N, H, V]; g: [N, H]; level_scales: [N, H, L];
        levels: [P, L, H, K, V] state pool (fp32 or bf16, the last two dims contiguous);
        slots: [N] int, distinct pool rows; positions: [N] int, index of this token in each
        sequence (must be < 2^(L-1); not checked, to stay free of host synchronisation).
        level_decay: [P, 2, L, H] float32 or None: the pool defers the decay
            (``kernels.naive.fused_recurrent_step_ref``); the step then stores levels 0 and z + 1 only.
        partials: when the tiled kernel runs, return its read-outs before their sum over blocks of K,
        [NK, N, H, V] float32 (scale applied), for a consumer that fuses the sum
        (kernels.norm.gated_rmsnorm); the level loop returns o as usual.
        tile: all levels of a [block_k, block_v] tile loaded at once, or one level after the other
        (the level loop); default by size and pool, from H200 timings (docs/kernels-notes.md):
        the loop up to N * H < 512 (latency bound, no partial sums to add), tiles of [4, 64] beyond for
        fp32 pools; bf16 pools keep the loop (the tiles reached 1.4 TB/s there, the loop 1.7-1.9), and
        so do pools with deferred decay (loop [128, 32]: 91 us at N = 32, 95% of copy bandwidth;
        the best tile 192 us).
    Returns:
        o: [N, H, V] in v's dtype (or the float32 partials).
    """
    check_shapes(q, k, v, g, level_scales)
    N, G, K = q.shape
    H, V = v.shape[-2:]
    L = level_scales.shape[-1]
    if levels.shape[1:] != (L, H, K, V) or levels.stride(-1) != 1 or levels.stride(-2) != V:
        raise ValueError(f"levels must be [P, {L}, {H}, {K}, {V}] with contiguous [K, V] blocks, "
                         f"got {tuple(levels.shape)} strides {levels.stride()}")
    if level_decay is not None:
        check_level_decay(level_decay, levels)
    scale = K ** -0.5 if scale is None else scale
    q, k, v, g, level_scales = (unit_last(x) for x in (q, k, v, g, level_scales))
    if tile is None:
        tile = N * H >= 512 and levels.dtype == torch.float32 and level_decay is None
    if not tile:
        return _step_loop(q, k, v, g, level_scales, levels, level_decay, slots, positions, scale, block_v)
    LP = triton.next_power_of_2(L)
    BV = block_v or min(64, max(16, triton.next_power_of_2(V)))
    BK = block_k or max(1, min(triton.next_power_of_2(K), 4096 // (LP * BV)))
    NK, NV = triton.cdiv(K, BK), triton.cdiv(V, BV)
    o = torch.empty(NK, N, H, V, dtype=torch.float32, device=v.device)
    if N > 0:
        _fused_recurrent_step_tile_kernel[(H * NK * NV, N)](
            q, k, v, g, level_scales, levels, _or(level_decay, levels), slots, positions, o,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
            level_scales.stride(0), level_scales.stride(1), o.stride(1), o.stride(2), o.stride(0),
            levels.stride(0), levels.stride(1), levels.stride(2),
            scale, H=H, G=G, K=K, V=V, L=L, LP=LP, BK=BK, BV=BV, NK=NK, NV=NV, DEFER=level_decay is not None,
            num_warps=num_warps or max(2, LP * BK * BV // 2048), **pdl.options(o),
        )
    if partials:
        return o
    return (o[0] if NK == 1 else o.sum(0)).to(v.dtype)


def _step_loop(q, k, v, g, level_scales, levels, level_decay, slots, positions, scale, block_v):
    N, G, K = q.shape
    H, V = v.shape[-2:]
    L = level_scales.shape[-1]
    o = torch.empty(N, H, V, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    BK = max(16, triton.next_power_of_2(K))
    if block_v is None:  # H200 (docs/kernels-notes.md): one program per head from N = 8; [*, 32] tiles
        block_v = 32 if N * H < 128 or level_decay is not None else 64  # with deferred decay
    BV = min(max(16, triton.next_power_of_2(V)), block_v)
    NV = triton.cdiv(V, BV)
    _fused_recurrent_step_kernel[(H * NV, N)](
        q, k, v, g, level_scales, levels, _or(level_decay, levels), slots, positions, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        level_scales.stride(0), level_scales.stride(1), o.stride(0), o.stride(1),
        levels.stride(0), levels.stride(1), levels.stride(2),
        scale, H=H, G=G, K=K, V=V, L=L, BK=BK, BV=BV, NV=NV, DEFER=level_decay is not None,
        num_warps=4 if BK * BV >= 4096 else 2, **pdl.options(o),
    )
    return o


def _or(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    """A pointer argument that the kernel reads only when t is given (a constexpr flag says so)."""
    return dummy if t is None else t
