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
from .ops import unit_last
from .state import check_level_decay, check_shapes
from .triton_utils import program_row, token_inputs


@triton.jit
def _fused_recurrent_step_kernel(
    q, k, v, g, lam, levels, decay, slots, positions, o,
    s_qn, s_qg, s_kn, s_kg, s_vn, s_vh, s_gn, s_ln, s_lh, s_on, s_oh, s_sp, s_sl, s_sh,
    scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, DEFER: tl.constexpr, USE_PDL: tl.constexpr,
):
    i_n, i_h, i_v, i_g, i_s, t = program_row(slots, positions, H, G, NV, USE_PDL)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    b_q, b_k, b_v, b_decay = token_inputs(q, k, v, g, i_n, i_g, i_h, o_k, o_v, m_k, m_v,
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


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float | None = None, *,
                         level_decay: torch.Tensor | None = None, block_v: int | None = None) -> torch.Tensor:
    """One decode token for N sequences held in a pool; updates ``levels[slots]`` in place.

    Args:
        q, k: [N, G, K]; v: [N, H, V]; g: [N, H]; level_scales: [N, H, L];
        levels: [P, L, H, K, V] state pool (fp32 or bf16, the last two dims contiguous);
        slots: [N] int, distinct pool rows; positions: [N] int, index of this token in each
        sequence (must be < 2^(L-1); not checked, to stay free of host synchronisation).
        level_decay: [P, 2, L, H] float32 or None: the pool defers the decay
            (``naive.fused_recurrent_step_ref``); the step then stores levels 0 and z + 1 only.
        block_v: the V tile of a program (tests); default by batch and pool.
    Returns:
        o: [N, H, V] in v's dtype.
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
    o = torch.empty(N, H, V, dtype=v.dtype, device=v.device)
    if N == 0:
        return o
    BK = max(16, triton.next_power_of_2(K))
    if block_v is None:  # one program per head from N = 8; [*, 32] tiles with deferred decay (kernels-notes)
        block_v = 32 if N * H < 128 or level_decay is not None else 64
    BV = min(max(16, triton.next_power_of_2(V)), block_v)
    NV = triton.cdiv(V, BV)
    _fused_recurrent_step_kernel[(H * NV, N)](
        q, k, v, g, level_scales, levels, levels if level_decay is None else level_decay, slots, positions, o,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
        level_scales.stride(0), level_scales.stride(1), o.stride(0), o.stride(1),
        levels.stride(0), levels.stride(1), levels.stride(2),
        scale, H=H, G=G, K=K, V=V, L=L, BK=BK, BV=BV, NV=NV, DEFER=level_decay is not None,
        num_warps=4 if BK * BV >= 4096 else 2, **pdl.options(o),
    )
    return o
