"""Chunked prefill for log-linear attention in Triton: parallel over chunks and heads.

Positions are absolute (the initial state's position counts) and chunks of ``BT`` tokens are aligned
to absolute positions, so for a query in chunk ``c`` every key in an earlier chunk ``c'`` sits at
level ``log2(BT) + bitlen(c ^ c')``: the inter-chunk part is the Fenwick recurrence over chunks.
The state chunk ``c`` sees at chunk level ``j`` is the decayed sum over the aligned block of
``2^(j-1)`` chunks that ends where the lower bits of ``c`` begin; that block is node ``e - 1`` of a
Fenwick tree over per-chunk summaries (node ``i`` sums chunks ``(i - lowbit(i+1), i]``).

Three steps, all parallel over chunks and heads:
  1. ``_chunk_node_kernel``: the nodes of at most ``2^Z0`` chunks, straight from k and v;
  2. ``_node_fold_kernel``: one launch per larger node size, folding the children of each node;
  3. ``_chunk_output_kernel``: per chunk, the masked intra-chunk form (levels <= log2 BT), one
     product per live inter-chunk level, the initial state, and the final Fenwick state.

The initial state at position p0 enters as its merged levels ``M`` (the merge the recurrence does
before absorbing token p0): for any query t >= p0, ``M[l]`` sits at level ``max(l, bitlen(t ^ p0))``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .chunk_plan import CHUNK_SIZE, DIRECT_LEVELS, ChunkPlan, build_plan
from .pool_torch import initial_levels, merge_for_query
from .pool_triton import pooled_merged_levels
from .state import (
    FenwickState,
    PooledState,
    check_final_into,
    check_initial_state,
    check_shapes,
    max_positions,
)
from .triton_utils import bitlen, bitlen_fast, dot, log2_pow2, popcount

NUM_WARPS = 4


@triton.jit
def _chunk_node_kernel(
    k, v, g, nodes, node_decay,
    num_chunks, chunk_seq, seq_bos, seq_start, seq_len, seq_node0,
    s_kt, s_kg, s_vt, s_vh, s_gt,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, Z0: tl.constexpr,
    IN_DT: tl.constexpr, ST_DT: tl.constexpr, PREC: tl.constexpr,
):
    i_hv, i_c = tl.program_id(0), tl.program_id(1)
    if i_c >= tl.load(num_chunks):  # the grid holds the plan's capacity
        return
    i_h, i_v = i_hv // NV, i_hv % NV
    i_g = i_h // (H // G)
    i_n = tl.load(chunk_seq + i_c).to(tl.int64)
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    p0 = tl.load(seq_start + i_n).to(tl.int64)
    pe = p0 + tl.load(seq_len + i_n).to(tl.int64)
    node0 = tl.load(seq_node0 + i_n).to(tl.int64)
    cf, ce = p0 // BT, (pe - 1) // BT
    c = cf + i_c - node0
    if c < ce:
        o_i = tl.arange(0, BT)
        o_k = tl.arange(0, BK)
        o_v = i_v * BV + tl.arange(0, BV)
        m_k, m_v = o_k < K, o_v < V
        size = tl.minimum((c + 1) & -(c + 1), 1 << Z0)
        b_s = tl.zeros([BK, BV], dtype=tl.float32)
        b_a = 0.0
        for i_m in range(0, size):
            cm = c + 1 - size + i_m
            if cm >= cf:
                t_abs = cm * BT + o_i
                m_t = (t_abs >= p0) & (t_abs < pe)
                row = bos + t_abs - p0
                p_k = k + row[:, None] * s_kt + i_g * s_kg + o_k[None, :]
                p_v = v + row[:, None] * s_vt + i_h * s_vh + o_v[None, :]
                b_k = tl.load(p_k, mask=m_t[:, None] & m_k[None, :], other=0.0)
                b_v = tl.load(p_v, mask=m_t[:, None] & m_v[None, :], other=0.0)
                b_g = tl.load(g + row * s_gt + i_h, mask=m_t, other=0.0).to(tl.float32)
                b_gl = tl.cumsum(b_g, axis=0)
                b_last = tl.sum(b_g, axis=0)
                b_vd = b_v.to(tl.float32) * tl.exp(b_last - b_gl)[:, None]
                b_s = b_s * tl.exp(b_last) + dot(tl.trans(b_k), b_vd, ST_DT, PREC)
                b_a += b_last
        p_s = nodes + (i_c * H + i_h) * (K * V) + o_k[:, None] * V + o_v[None, :]
        tl.store(p_s, b_s.to(p_s.dtype.element_ty), mask=m_k[:, None] & m_v[None, :])
        if i_v == 0:
            tl.store(node_decay + i_c * H + i_h, b_a)


@triton.jit
def _node_fold_kernel(
    nodes, node_decay, fold_idx,
    chunk_seq, seq_start, seq_node0,
    z,
    H: tl.constexpr, K: tl.constexpr, V: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr, Z0: tl.constexpr,
):
    """One program per (head, node) folds its children into every V tile of the node, then stores the
    node's decay: once, after every tile has read the node's own (a program per tile would race on it).
    Slots of -1 (past this step's nodes of the size) return at once."""
    i_h, i_x = tl.program_id(0), tl.program_id(1)
    i_c = tl.load(fold_idx + i_x).to(tl.int64)
    if i_c < 0:
        return
    i_n = tl.load(chunk_seq + i_c).to(tl.int64)
    p0 = tl.load(seq_start + i_n).to(tl.int64)
    node0 = tl.load(seq_node0 + i_n).to(tl.int64)
    cf = p0 // BT
    c = cf + i_c - node0
    o_k = tl.arange(0, BK)
    b_a0 = tl.load(node_decay + i_c * H + i_h)
    b_a = b_a0
    for i_v in range(NV):
        o_v = i_v * BV + tl.arange(0, BV)
        m_kv = (o_k[:, None] < K) & (o_v[None, :] < V)
        o_kv = o_k[:, None] * V + o_v[None, :]
        b_s = tl.load(nodes + (i_c * H + i_h) * (K * V) + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_a = b_a0
        for zz in range(Z0, z):
            cc = c - (1 << zz)
            if cc >= cf:
                i_cc = node0 + cc - cf
                b_n = tl.load(nodes + (i_cc * H + i_h) * (K * V) + o_kv, mask=m_kv, other=0.0).to(tl.float32)
                b_s += tl.exp(b_a) * b_n
                b_a += tl.load(node_decay + i_cc * H + i_h)
        tl.store(nodes + (i_c * H + i_h) * (K * V) + o_kv, b_s.to(nodes.dtype.element_ty), mask=m_kv)
    tl.store(node_decay + i_c * H + i_h, b_a)


@triton.jit
def _level_state(nodes, node_decay, m_lv, cm_lv, l, c, cf, lc, p0, node0, i_n, i_h, b_acc, o_kv, m_kv,
                 H: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr, BTLOG: tl.constexpr,
                 BK: tl.constexpr, BV: tl.constexpr, HAS_INIT: tl.constexpr):
    """The fp32 state chunk c sees at level l (its node and the initial state's share), decayed to the
    chunk's start; ``b_acc`` is the log-decay from the end of the level's node to that start."""
    j = l - BTLOG
    e = (c >> (j - 1)) << (j - 1)
    use_node = (((c >> (j - 1)) & 1) == 1) & (e > cf)
    use_init = (l == lc) | ((l > lc) & (((p0 >> (l - 1)) & 1) == 1))
    b_h = tl.zeros([BK, BV], dtype=tl.float32)
    if use_node:
        i_e = node0 + e - 1 - cf
        b_n = tl.load(nodes + (i_e * H + i_h) * (K * V) + o_kv, mask=m_kv, other=0.0).to(tl.float32)
        b_h += b_n * tl.exp(b_acc)
        b_acc += tl.load(node_decay + i_e * H + i_h)
    if HAS_INIT:
        if use_init:
            p_m = tl.where(l == lc, cm_lv, m_lv) + ((i_n * L + l) * H + i_h) * (K * V) + o_kv
            b_h += tl.load(p_m, mask=m_kv, other=0.0) * tl.exp(b_acc)
    return b_h, b_acc, use_node | use_init


@triton.jit
def _chunk_output_kernel(
    q, k, v, g, lam, o, nodes, node_decay, m_lv, cm_lv, final_lv, final_rows,
    num_chunks, chunk_seq, seq_bos, seq_start, seq_len, seq_node0,
    s_qt, s_qg, s_kt, s_kg, s_vt, s_vh, s_gt, s_lt, s_lh, s_ot, s_oh,
    scale,
    H: tl.constexpr, G: tl.constexpr, K: tl.constexpr, V: tl.constexpr, L: tl.constexpr,
    BT: tl.constexpr, BTLOG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, NV: tl.constexpr,
    CBITS: tl.constexpr, HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
    IN_DT: tl.constexpr, ST_DT: tl.constexpr, PREC: tl.constexpr, BL: tl.constexpr, LO: tl.constexpr,
):
    i_hv, i_c = tl.program_id(0), tl.program_id(1)
    if i_c >= tl.load(num_chunks):  # the grid holds the plan's capacity
        return
    i_h, i_v = i_hv // NV, i_hv % NV
    i_g = i_h // (H // G)
    i_n = tl.load(chunk_seq + i_c).to(tl.int64)
    bos = tl.load(seq_bos + i_n).to(tl.int64)
    p0 = tl.load(seq_start + i_n).to(tl.int64)
    pe = p0 + tl.load(seq_len + i_n).to(tl.int64)
    node0 = tl.load(seq_node0 + i_n).to(tl.int64)
    cf, ce = p0 // BT, (pe - 1) // BT
    c = cf + i_c - node0
    i_f = i_n  # the sequence's row of final_lv
    if STORE_FINAL:
        i_f = tl.load(final_rows + i_n).to(tl.int64)

    o_i = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k, m_v = o_k < K, o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_kv = o_k[:, None] * V + o_v[None, :]
    t_abs = c * BT + o_i
    m_t = (t_abs >= p0) & (t_abs < pe)
    row = bos + t_abs - p0
    p_lam = lam + row * s_lt + i_h * s_lh  # (BT,) row starts of level_scales

    m_tk, m_tv = m_t[:, None] & m_k[None, :], m_t[:, None] & m_v[None, :]
    b_q = tl.load(q + row[:, None] * s_qt + i_g * s_qg + o_k[None, :], mask=m_tk, other=0.0)
    b_k = tl.load(k + row[:, None] * s_kt + i_g * s_kg + o_k[None, :], mask=m_tk, other=0.0)
    b_v = tl.load(v + row[:, None] * s_vt + i_h * s_vh + o_v[None, :], mask=m_tv, other=0.0)
    b_g = tl.load(g + row * s_gt + i_h, mask=m_t, other=0.0).to(tl.float32)
    b_gl = tl.cumsum(b_g, axis=0)
    b_glast = tl.sum(b_g, axis=0)

    # intra-chunk: levels 0..BTLOG; lambda levels 0..BTLOG of each row in one tile, gathered per (t, s)
    b_lvl = bitlen_fast(o_i[:, None] ^ o_i[None, :], BTLOG)
    m_s = (o_i[:, None] >= o_i[None, :]) & m_t[:, None] & m_t[None, :]
    o_l = tl.arange(0, BL)
    b_lt = tl.load(p_lam[:, None] + o_l[None, :], mask=m_t[:, None] & (o_l[None, :] < L), other=0.0)
    b_ls = tl.gather(b_lt, b_lvl, axis=1).to(tl.float32)
    b_qk = dot(b_q, tl.trans(b_k), IN_DT, PREC)
    b_s = tl.where(m_s, b_qk * tl.exp(b_gl[:, None] - b_gl[None, :]) * b_ls, 0.0)
    b_o = dot(b_s, b_v, IN_DT, PREC)

    # inter-chunk: one Fenwick node per live chunk level, plus the initial state's levels; q (input
    # dtype) meets each state tile as stored, exp(g) * decay * lambda scale the product's rows after
    b_eg = tl.exp(b_gl)
    b_acc = 0.0  # log-decay from the end of the node being read to the start of chunk c
    if HAS_INIT:  # lc: the level of [0, p0)
        lc = BTLOG + tl.sum(bitlen(tl.full([1], 0, tl.int64) + (c ^ cf), CBITS), axis=0)
    else:
        lc = L
    b_qd = b_q.to(ST_DT)
    # live node levels: the set bits of c below bitlen(c ^ cf), lowest (nearest) first; bit b is node
    # (c & -b) - 1 at level BTLOG + 1 + log2(b)
    if HAS_INIT:
        rem = c & ((1 << (lc - BTLOG)) - 1)
    else:
        rem = c
    n_live = popcount(rem, CBITS)
    for _i_live in tl.range(0, n_live, num_stages=3):
        b = rem & -rem
        rem = rem ^ b
        i_e = node0 + (c & -b) - 1 - cf
        b_n = tl.load(nodes + (i_e * H + i_h) * (K * V) + o_kv, mask=m_kv, other=0.0)
        b_lam = tl.load(p_lam + BTLOG + 1 + log2_pow2(b), mask=m_t, other=0.0).to(tl.float32)
        b_o += dot(b_qd, b_n, ST_DT, PREC) * (tl.exp(b_gl + b_acc) * b_lam)[:, None]
        b_acc += tl.load(node_decay + i_e * H + i_h)
    if HAS_INIT:
        # every live node lies at a level <= lc: the initial state sees the whole decay
        for l in range(BTLOG + 1, L):
            if (l == lc) | ((l > lc) & (((p0 >> (l - 1)) & 1) == 1)):
                p_m = tl.where(l == lc, cm_lv, m_lv) + ((i_n * L + l) * H + i_h) * (K * V) + o_kv
                b_m = tl.load(p_m, mask=m_kv, other=0.0)
                b_lam = tl.load(p_lam + l, mask=m_t, other=0.0).to(tl.float32)
                b_o += dot(b_qd, b_m, ST_DT, PREC) * (tl.exp(b_gl + b_acc) * b_lam)[:, None]
    if STORE_FINAL:
        if c == ce:
            b_fa = 0.0
            for l in range(BTLOG + 1, L):
                b_h, b_fa, live_f = _level_state(nodes, node_decay, m_lv, cm_lv, l, c, cf, lc, p0, node0, i_n,
                                                 i_h, b_fa, o_kv, m_kv, H, K, V, L, BTLOG, BK, BV, HAS_INIT)
                if l >= LO:
                    p_f = final_lv + ((i_f * (L - LO) + l - LO) * H + i_h) * (K * V) + o_kv
                    tl.store(p_f, (b_h * tl.exp(b_glast)).to(p_f.dtype.element_ty), mask=m_kv)

    if HAS_INIT:
        if c == cf:
            # the initial state's levels <= BTLOG meet the first chunk's queries at a per-token level
            b_tl = bitlen(t_abs ^ p0, BTLOG)
            for li in tl.static_range(1, BTLOG + 1):
                if li < L:
                    if ((p0 >> (li - 1)) & 1) == 1:
                        p_m = m_lv + ((i_n * L + li) * H + i_h) * (K * V) + o_kv
                        b_m = tl.load(p_m, mask=m_kv, other=0.0)
                        b_lam = tl.load(p_lam + tl.maximum(b_tl, li), mask=m_t, other=0.0).to(tl.float32)
                        b_o += dot(b_qd, b_m, ST_DT, PREC) * (b_eg * b_lam)[:, None]

    p_o = o + row[:, None] * s_ot + i_h * s_oh + o_v[None, :]
    tl.store(p_o, (b_o * scale).to(p_o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])

    if STORE_FINAL:
        if c == ce:
            # levels 0..BTLOG of the last token te: masked sums over the last chunk
            i_te = (pe - 1) - c * BT
            b_le = bitlen(o_i ^ i_te, BTLOG)
            b_w = tl.where(m_t & (o_i <= i_te), tl.exp(b_glast - b_gl), 0.0)
            le = tl.sum(bitlen(tl.full([1], 0, tl.int64) + ((pe - 1) ^ p0), BTLOG), axis=0)
            for lf in tl.static_range(0, BTLOG + 1):
                if (lf < L) and (lf >= LO):  # a pool may hold only its top L - LO levels
                    b_vd = b_v.to(tl.float32) * tl.where(b_le == lf, b_w, 0.0)[:, None]
                    b_f = dot(tl.trans(b_k), b_vd, ST_DT, PREC)
                    if HAS_INIT:
                        if c == cf:
                            if lf == le:
                                b_f += tl.load(cm_lv + ((i_n * L + lf) * H + i_h) * (K * V) + o_kv,
                                               mask=m_kv, other=0.0) * tl.exp(b_glast)
                            elif lf > 0:
                                if (lf > le) & (((p0 >> (lf - 1)) & 1) == 1):
                                    b_f += tl.load(m_lv + ((i_n * L + lf) * H + i_h) * (K * V) + o_kv,
                                                   mask=m_kv, other=0.0) * tl.exp(b_glast)
                    p_f = final_lv + ((i_f * (L - LO) + lf - LO) * H + i_h) * (K * V) + o_kv
                    tl.store(p_f, b_f.to(p_f.dtype.element_ty), mask=m_kv)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[B, T, ...] -> [B*T, ...] with a unit stride on the last dimension."""
    x = x.reshape(-1, *x.shape[2:])
    return x if x.stride(-1) == 1 else x.contiguous()


def _dot_types(dtype: torch.dtype):
    """Operand types of the intra-chunk and the state products, and the fp32 product precision.

    States are fp32; they meet q in bf16 for bf16 inputs and in fp32 otherwise (fp16 could overflow).
    fp32 products run as three TF32 tensor-core products ("tf32x3": the split operands' cross terms,
    about fp32 accuracy): "ieee" lowers to FMA loops on the H200 whose compile (ptxas) took over 100 s
    for the packed-sequences-with-state kernel. Triton's CPU interpreter gets 16-bit products wrong, so
    there every product runs on fp32.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return tl.float32, tl.float32, "ieee"
    in_dt = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}.get(dtype, tl.float32)
    st_dt = tl.bfloat16 if dtype == torch.bfloat16 else tl.float32
    return in_dt, st_dt, "tf32x3" if dtype == torch.float32 else "tf32"


def _block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def chunk_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          level_scales: torch.Tensor, *, scale: float | None = None,
                          initial_state: FenwickState | PooledState | None = None,
                          output_final_state: bool = False,
                          cu_seqlens: torch.Tensor | None = None,
                          final_into: tuple[torch.Tensor, torch.Tensor] | None = None,
                          plan: ChunkPlan | None = None
                          ) -> tuple[torch.Tensor, FenwickState | None]:
    """Prefill: log-linear attention over whole chunks, continuing each sequence from its state.

    Args:
        q, k: [B, T, G, K]; v: [B, T, H, V] (bf16, fp16 or fp32); g: [B, T, H] log-decay (<= 0);
        level_scales: [B, T, H, L] (lambda); scale: defaults to K ** -0.5.
        initial_state: FenwickState(levels [N, L, H, K, V], positions [N]) with N = B, or
            N = len(cu_seqlens) - 1; any positions. Or a PooledState: the sequences' slots in the
            engine's pool, read there by one kernel (pool_triton.py).
        output_final_state: also return the state after each sequence (levels fp32).
        cu_seqlens: [N + 1] cumulative lengths of sequences packed along T (B must be 1).
        final_into: (pool [P, L, H, K, V] contiguous, slots [N] int64 on the device): the kernel writes
            each sequence's final levels straight into pool[slots] in the pool's dtype (no float32
            copy); a sequence with no new token keeps its row. The call then returns no state. A pool
            of L' < L levels holds the top L' (a windowed pool, state.py): the rest are dropped.
        plan: the chunk plan of these sequences (``chunk_plan.py``, built for the same lengths, start
            positions, L and chunking); None: built here from cu_seqlens and the initial positions
            (read back from the device).
    Returns:
        o: [B, T, H, V] in v's dtype; FenwickState(levels [N, L, H, K, V] fp32, positions [N] int64)
        if output_final_state (and no final_into) else None.
    """
    return chunk_log_linear_attn_impl(q, k, v, g, level_scales, scale=scale, initial_state=initial_state,
                                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                      final_into=final_into, plan=plan)


def chunk_log_linear_attn_impl(q, k, v, g, level_scales, *, scale=None, initial_state=None,
                               output_final_state=False, cu_seqlens=None, final_into=None, plan=None,
                               chunk_size: int = CHUNK_SIZE, direct_levels: int = DIRECT_LEVELS):
    """``chunk_log_linear_attn`` with its tiling exposed (tests use small chunks)."""
    check_shapes(q, k, v, g, level_scales)
    B, T, G, K = q.shape
    H, V = v.shape[-2:]
    L = level_scales.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    dev = q.device
    if cu_seqlens is not None and B != 1:
        raise ValueError(f"cu_seqlens needs B == 1, got B = {B}")
    if plan is None:
        bounds = [b * T for b in range(B + 1)] if cu_seqlens is None else cu_seqlens.tolist()
        lens = [bounds[i + 1] - bounds[i] for i in range(len(bounds) - 1)]
        starts = [0] * len(lens) if initial_state is None else initial_state.positions.tolist()
        if len(starts) != len(lens):
            raise ValueError(f"{len(starts)} initial positions for {len(lens)} sequences")
        plan = build_plan(starts, lens, L, dev, chunk_size, direct_levels)
    elif plan.chunk_size != chunk_size or plan.direct_levels != direct_levels:
        raise ValueError("the plan was built for another chunking")
    N, NC = plan.num_seqs, plan.capacity.chunks
    check_initial_state(initial_state, N, (L, H, K, V))
    BT = chunk_size
    BTLOG = BT.bit_length() - 1
    t_bos, t_start, t_len, t_node0 = plan.seq_rows

    qr, kr, vr, gr, lr = (_rows(x) for x in (q, k, v, g, level_scales))
    o = torch.empty(B * T, H, V, dtype=v.dtype, device=dev)
    BK, BV = _block(K), min(64, _block(V))
    NV = triton.cdiv(V, BV)
    in_dt, st_dt, prec = _dot_types(v.dtype)
    low = 0  # levels below it are not stored (a windowed pool keeps only its top levels)
    if final_into is not None:
        final, final_rows = final_into
        low = check_final_into(final, final_rows, N, (L, H, K, V), dev)
    elif output_final_state:
        final = torch.empty(N, L, H, K, V, dtype=torch.float32, device=dev)
        final_rows = torch.arange(N, device=dev)
    else:
        final = final_rows = None
    has_init = initial_state is not None
    if isinstance(initial_state, PooledState):  # read from the engine's pool in one launch
        m_lv, cm_lv = pooled_merged_levels(initial_state)
    elif has_init:
        m_lv = merge_for_query(initial_state.levels, initial_state.positions).contiguous()
        cm_lv = m_lv.cumsum(1).contiguous()
    # nodes meet q in bf16 anyway for bf16 inputs: stored so, at half the bytes
    node_dtype = torch.bfloat16 if v.dtype == torch.bfloat16 else torch.float32
    nodes = torch.empty(max(NC, 1), H, K, V, dtype=node_dtype, device=dev)
    node_decay = torch.empty(max(NC, 1), H, dtype=torch.float32, device=dev)

    if NC:
        # bits of any chunk index below max_positions(L): fixed per model, so a prompt reaching a new
        # power of two never compiles a new output kernel in the middle of serving
        cbits = max(((max_positions(L) - 1) // BT).bit_length(), 1)
        rows = (plan.num_chunks, plan.chunk_seq, t_bos, t_start, t_len, t_node0)
        _chunk_node_kernel[(H * NV, NC)](
            kr, vr, gr, nodes, node_decay, *rows,
            kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1), gr.stride(0),
            H=H, G=G, K=K, V=V, BT=BT, BK=BK, BV=BV, NV=NV, Z0=direct_levels,
            IN_DT=in_dt, ST_DT=st_dt, PREC=prec, num_warps=NUM_WARPS,
        )
        for z, idx in plan.folds:
            if idx.numel():
                _node_fold_kernel[(H, idx.numel())](
                    nodes, node_decay, idx, plan.chunk_seq, t_start, t_node0, z,
                    H=H, K=K, V=V, BT=BT, BK=BK, BV=BV, NV=NV, Z0=direct_levels, num_warps=NUM_WARPS,
                )
        dummy = nodes
        _chunk_output_kernel[(H * NV, NC)](
            qr, kr, vr, gr, lr, o, nodes, node_decay,
            m_lv if has_init else dummy, cm_lv if has_init else dummy, final if final is not None else dummy,
            final_rows if final is not None else dummy, *rows,
            qr.stride(0), qr.stride(1), kr.stride(0), kr.stride(1), vr.stride(0), vr.stride(1), gr.stride(0),
            lr.stride(0), lr.stride(1),
            o.stride(0), o.stride(1), scale,
            H=H, G=G, K=K, V=V, L=L, BT=BT, BTLOG=BTLOG, BK=BK, BV=BV, NV=NV, CBITS=cbits,
            HAS_INIT=has_init, STORE_FINAL=final is not None, IN_DT=in_dt, ST_DT=st_dt, PREC=prec,
            BL=triton.next_power_of_2(BTLOG + 1), LO=low, num_warps=NUM_WARPS,
        )
    o = o.view(B, T, H, V)
    if final is None or final_into is not None:
        return o, None
    empty = t_len == 0  # sequences with no new token keep their state (a read-back: not the engine's path)
    if bool(empty.any()):
        final[empty] = initial_levels(initial_state)[empty].float() if has_init else 0.0
    return o, FenwickState(final, plan.ends.clone())  # a plan may serve several calls: no shared tensor
