"""Chunked log-linear attention in PyTorch: the CPU prefill path.

Positions are cut into chunks of C tokens aligned to absolute positions (multiples of C). Inside a chunk
every level is below log2(C) + 1 and depends only on the positions modulo C, so a chunk is a masked
quadratic form. A source s before the chunk [c0, c0 + C) of a query t sits at
level(t, s) == level(c0, s) = log2(C) + bitlen(chunk(t) ^ chunk(s)): the Fenwick recurrence again, at chunk
granularity. Its buckets are aligned blocks of 2^(m-1) chunks (chunk level m = level - log2(C)); a tree of
block summaries, each decayed to its last token, is built one level at a time, and a query chunk reads one
block per set bit of its chunk index. Work: O(T * C) inside chunks plus O(T log T) across them.

A sequence that starts mid-chunk or ends mid-chunk is padded to whole chunks with tokens whose k, v and
g are zero, so they add nothing and decay nothing. The initial state, merged for the first query as the
recurrence would merge it, supplies whole blocks (its levels above log2(C)) to the tree and, when the first
position is not a multiple of C, its low levels to the first chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .pool_torch import initial_levels
from .state import (
    FenwickState,
    PooledState,
    check_final_into,
    check_initial_state,
    check_shapes,
    ctz,
    level_matrix,
    max_positions,
)

CHUNK_SIZE = 64
_MIN_AUTO_CHUNK = 16  # batches of short sequences (decode-like continuations) use chunks this small
_BLOCK_ELEMS = 1 << 22  # elements of one [chunks, H, C, C] temporary; bounds memory on long prompts


def chunk_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          level_scales: torch.Tensor, *, scale: float | None = None,
                          initial_state: FenwickState | PooledState | None = None,
                          output_final_state: bool = False,
                          cu_seqlens: torch.Tensor | None = None, chunk_size: int | None = None,
                          final_into: tuple[torch.Tensor, torch.Tensor] | None = None
                          ) -> tuple[torch.Tensor, FenwickState | None]:
    """Prefill: log-linear attention over T tokens per sequence, continuing from any position.

    Same contract as ``kernels.naive.recurrent_log_linear_attn``.

    Args:
        q, k: [B, T, G, K]; v: [B, T, H, V] (H a multiple of G); g: [B, T, H] log-decay (<= 0);
        level_scales: [B, T, H, L] (lambda, positive).
        scale: defaults to K ** -0.5.
        initial_state: FenwickState(levels [N, L, H, K, V], positions [N]); N = B, or len(cu_seqlens) - 1
            with cu_seqlens. A sequence at position 0 starts empty whatever its levels hold. Or a
            PooledState (kernels/pool_state.py): the sequences' slots in the engine's pool.
        output_final_state: return the state after the last token of each sequence.
        cu_seqlens: [N + 1] cumulative lengths of the sequences packed along T (B must be 1).
        chunk_size: a power of two; positions are chunked at its multiples. None: CHUNK_SIZE, or the
            smallest power of two >= 16 that holds the longest sequence when that is shorter.
        final_into: (pool [P, L, H, K, V], slots [N] int64): write each sequence's final levels into
            pool[slots] in the pool's dtype instead of returning them (rows of sequences with no new
            token are left as they are); the second result is then None.
    Returns:
        o: [B, T, H, V] in v's dtype; final state (levels [N, L, H, K, V] in float32, float64 for float64
        inputs; positions [N] int64) or None.
    """
    rep, L = check_shapes(q, k, v, g, level_scales)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, G, K], got {tuple(q.shape)}")
    if chunk_size is not None and (chunk_size < 1 or chunk_size & (chunk_size - 1)):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    B, T, G, K = q.shape
    H, V = v.shape[-2:]
    scale = K ** -0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32

    if cu_seqlens is None:
        bounds = [b * T for b in range(B + 1)]
    else:
        if B != 1:
            raise ValueError(f"cu_seqlens needs B == 1, got B = {B}")
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != T or sorted(bounds) != bounds:
            raise ValueError(f"cu_seqlens must rise from 0 to T = {T}, got {bounds}")
    N = len(bounds) - 1
    if initial_state is None:
        starts = [0] * N
    else:
        check_initial_state(initial_state, N, (L, H, K, V))
        starts = [int(p) for p in initial_state.positions.tolist()]
        if any(p < 0 for p in starts):
            raise ValueError(f"initial_state.positions must be >= 0, got {starts}")
    lengths = [bounds[n + 1] - bounds[n] for n in range(N)]
    ends = [starts[n] + lengths[n] for n in range(N)]
    if ends and max(ends) > max_positions(L):
        raise ValueError(
            f"sequence reaches {max(ends)} tokens but {L} levels hold at most {max_positions(L)}"
        )

    if chunk_size is None:
        longest = max(lengths, default=1)
        chunk_size = min(CHUNK_SIZE, max(_MIN_AUTO_CHUNK, 1 << max(longest - 1, 0).bit_length()))
    init = None if initial_state is None else initial_levels(initial_state, dt)
    o, levels = _chunked(q.reshape(B * T, G, K), k.reshape(B * T, G, K), v.reshape(B * T, H, V),
                         g.reshape(B * T, H), level_scales.reshape(B * T, H, L), bounds, starts, init,
                         scale, chunk_size, dt, output_final_state or final_into is not None)
    o = o.view(B, T, H, V).to(v.dtype)
    if final_into is not None:
        pool, slots = final_into
        low = check_final_into(pool, slots, N, (L, H, K, V), q.device)
        moved = torch.tensor([n for n in range(N) if lengths[n]], dtype=torch.int64, device=q.device)
        pool.index_copy_(0, slots[moved], levels[moved, low:].to(pool.dtype))
        return o, None
    if not output_final_state:
        return o, None
    return o, FenwickState(levels, torch.tensor(ends, dtype=torch.int64, device=q.device))


@dataclass
class _Layout:
    """Where the tokens of the non-empty sequences sit in the grid of padded chunks (all int64)."""

    p0: torch.Tensor  # (S,) first position of each sequence
    end: torch.Tensor  # (S,) position after its last token
    j0: torch.Tensor  # (S,) absolute index of its first chunk
    jl: torch.Tensor  # (S,) absolute index of its last chunk
    co: torch.Tensor  # (S,) grid index of its first chunk
    ch_seq: torch.Tensor  # (NC,) sequence of each grid chunk
    ch_j: torch.Tensor  # (NC,) absolute index of each grid chunk
    dst: torch.Tensor  # (T_total,) padded slot of each token


def _layout(starts: list[int], lengths: list[int], C: int, device: torch.device) -> _Layout:
    i64 = {"dtype": torch.int64, "device": device}
    p0 = torch.tensor(starts, **i64)
    n = torch.tensor(lengths, **i64)
    end = p0 + n
    j0, jl = p0 // C, (end - 1) // C
    nch = jl - j0 + 1
    co = nch.cumsum(0) - nch
    ch_seq = torch.repeat_interleave(torch.arange(len(starts), **i64), nch)
    ch_j = j0[ch_seq] + torch.arange(ch_seq.numel(), **i64) - co[ch_seq]
    first_tok = n.cumsum(0) - n
    shift = co * C + p0 - j0 * C - first_tok
    dst = torch.arange(int(n.sum()), **i64) + torch.repeat_interleave(shift, n)
    return _Layout(p0, end, j0, jl, co, ch_seq, ch_j, dst)


def _intra(qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, Gl: torch.Tensor, lam: torch.Tensor,
           lvl: torch.Tensor, causal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked quadratic form inside chunks and each chunk's summary decayed to its last token.

    Args:
        qc, kc: [n, C, G, K]; vc: [n, C, H, V]; Gl: [n, C, H] chunk-local cumulative log-decay;
        lam: [n, C, H, L]; lvl: [C, C] chunk-relative levels; causal: [C, C] bool.
    Returns:
        (o [n, H, C, V], summary [n, H, K, V]).
    """
    n, C, G, _ = qc.shape
    H = vc.shape[2]
    rep = H // G
    scores = qc.transpose(1, 2) @ kc.permute(0, 2, 3, 1)  # (n, G, C, C)
    Gh = Gl.transpose(1, 2)  # (n, H, C)
    A = (Gh[..., :, None] - Gh[..., None, :]).masked_fill_(~causal, float("-inf")).exp_()  # (n, H, C, C)
    A.mul_(torch.gather(lam.transpose(1, 2), 3, lvl.expand(n, H, C, C)))
    A.view(n, G, rep, C, C).mul_(scores[:, :, None])
    vh = vc.transpose(1, 2)  # (n, H, C, V)
    kd = kc.repeat_interleave(rep, dim=2).mul_((Gl[:, -1:] - Gl).exp_()[..., None])  # (n, C, H, K)
    return A @ vh, kd.permute(0, 2, 3, 1) @ vh


class _Merged:
    """The initial state merged for each sequence's first query p0, read block by block.

    Before absorbing token p0 > 0 the recurrence folds levels 0..z (z = ctz(p0)) into z + 1; after that,
    level l >= 1 holds Fenwick bucket l of query p0. Only the blocks asked for are read.
    """

    def __init__(self, init: torch.Tensor, act: torch.Tensor, p0: torch.Tensor, dt: torch.dtype) -> None:
        self.init, self.act, self.dt = init, act, dt  # init: (N, L, H, K, V), any dtype and strides
        L = init.shape[1]
        self.top = (ctz(p0) + 1).clamp(max=L - 1)  # (S,) level that receives the fold, 0 at p0 == 0
        self.empty = p0 == 0
        s, l = (torch.arange(L, device=p0.device)[None, :] <= self.top[:, None]).nonzero(as_tuple=True)
        self.carry = torch.zeros(p0.numel(), *init.shape[2:], dtype=dt, device=p0.device)
        self.carry.index_add_(0, s, init[act[s], l].to(dt))  # (S, H, K, V)

    def get(self, s: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
        """Merged level l[i] of sequence s[i]: [R, H, K, V] in dt."""
        blocks = self.init[self.act[s], l].to(self.dt, copy=True)
        top = l == self.top[s]
        blocks[top] = self.carry[s[top]]
        blocks[(l < self.top[s]) | self.empty[s]] = 0
        return blocks


def _chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, lam: torch.Tensor,
             bounds: list[int], starts: list[int], init: torch.Tensor | None, scale: float, C: int,
             dt: torch.dtype, want_state: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Packed sequences: q, k [T, G, K]; v [T, H, V]; g [T, H]; lam [T, H, L]; init [N, L, H, K, V] or None.

    Returns (o [T, H, V], final levels [N, L, H, K, V] or None), both in dt.
    """
    Ttot, G, K = q.shape
    H, V = v.shape[1:]
    L = lam.shape[-1]
    LOG = C.bit_length() - 1
    dev = q.device
    N = len(bounds) - 1
    lengths = [bounds[n + 1] - bounds[n] for n in range(N)]
    act = [n for n in range(N) if lengths[n] > 0]
    act_t = torch.tensor(act, dtype=torch.int64, device=dev)
    final = None
    if want_state:
        final = torch.zeros(N, L, H, K, V, dtype=dt, device=dev)
        if init is not None and len(act) < N:
            idle = torch.tensor([n for n in range(N) if lengths[n] == 0], dtype=torch.int64, device=dev)
            final[idle] = init.to(dev)[idle].to(dt)
    if not act:
        return torch.zeros(Ttot, H, V, dtype=dt, device=dev), final

    lay = _layout([starts[n] for n in act], [lengths[n] for n in act], C, dev)
    S, NC = len(act), lay.ch_seq.numel()
    P = NC * C

    def pad(x: torch.Tensor, dtype: torch.dtype = dt) -> torch.Tensor:
        if P == Ttot:  # every sequence starts and ends on a chunk boundary
            return x.to(dtype).contiguous()
        out = torch.zeros(P, *x.shape[1:], dtype=dtype, device=dev)
        return out.index_copy_(0, lay.dst, x.to(dtype))

    qc = (pad(q) * scale).view(NC, C, G, K)
    kc = pad(k).view(NC, C, G, K)
    vc = pad(v).view(NC, C, H, V)
    lamc = pad(lam).view(NC, C, H, L)
    g64 = pad(g, torch.float64)  # (P, H); cumulative sums in float64, differences then fit dt
    Gl = g64.view(NC, C, H).cumsum(1)  # (NC, C, H) from each chunk's first token
    Gcum = g64.cumsum(0)
    first = lay.co * C
    base = torch.zeros(S, H, dtype=torch.float64, device=dev)
    base[first > 0] = Gcum[first[first > 0] - 1]
    Gtok = Gcum - base[lay.ch_seq.repeat_interleave(C)]  # (P, H) from each sequence's first token

    # 1. inside chunks
    ar = torch.arange(C, device=dev)
    lvl = level_matrix(ar[:, None], ar[None, :]).clamp(max=L - 1)  # (C, C)
    causal = ar[:, None] >= ar[None, :]
    o_c = torch.empty(NC, H, C, V, dtype=dt, device=dev)
    summ = torch.empty(NC, H, K, V, dtype=dt, device=dev)
    Gl_dt = Gl.to(dt)
    nb = max(1, _BLOCK_ELEMS // (H * C * C))
    for a in range(0, NC, nb):
        sl = slice(a, a + nb)
        o_c[sl], summ[sl] = _intra(qc[sl], kc[sl], vc[sl], Gl_dt[sl], lamc[sl], lvl, causal)

    # 2. the initial state, merged for each sequence's first query
    merged = None
    nlow = min(LOG, L - 1)
    if init is not None and bool((lay.p0 > 0).any()):
        merged = _Merged(init.to(dev), act_t, lay.p0, dt)
        if nlow > 0:
            _head_low(merged, nlow, qc, lamc, Gl, summ, o_c, lay)

    # 3. across chunks: the block tree, one chunk level at a time
    tree = None
    for m in range(1, int(lay.jl.max()).bit_length() + 1):
        tree = _tree_level(m, tree, summ, merged, Gtok, lay, C)
        _inter(m, tree, qc, lamc, Gtok.view(NC, C, H), o_c, lay, nb)
        if final is not None:
            _final_high(m, tree, Gtok, final, act_t, lay, C)

    o = o_c.permute(0, 2, 1, 3).reshape(P, H, V)
    if P != Ttot:
        o = o.index_select(0, lay.dst)
    if final is not None:
        _final_low(final, act_t, merged, kc, vc, Gl, lay, nlow)
    return o, final


def _head_low(merged: _Merged, n: int, qc: torch.Tensor, lam: torch.Tensor, Gl: torch.Tensor,
              summ: torch.Tensor, o_c: torch.Tensor, lay: _Layout) -> None:
    """Add the initial state's merged levels 1..n (its tokens in the first chunk, before the first position)
    to the first chunk's outputs and summary, in place, for the sequences that start mid-chunk.

    Args:
        qc: [NC, C, G, K] (scaled); lam: [NC, C, H, L]; Gl: [NC, C, H] float64; summ: [NC, H, K, V];
        o_c: [NC, H, C, V].
    """
    C, G = qc.shape[1:3]
    H, L = lam.shape[2:]
    dev, dt = qc.device, qc.dtype
    seqs = (lay.p0 % C != 0).nonzero().squeeze(1)
    S = seqs.numel()
    if S == 0:
        return
    NC = qc.shape[0]
    ells = torch.arange(1, n + 1, device=dev)
    K, V = summ.shape[-2:]
    low = merged.get(seqs.repeat_interleave(n), ells.repeat(S)).view(S, n, H, K, V)
    hc, p0 = lay.co[seqs], lay.p0[seqs]
    r0 = p0 % C
    count = torch.minimum(lay.end[seqs] - p0, C - r0)  # (S,) queries of the sequence in its first chunk
    W = int(count.max())
    t_rel = (r0[:, None] + torch.arange(W, device=dev)) % C  # (S, W), distinct per row
    rows = hc[:, None] * C + t_rel
    s_abs = p0[:, None] - p0[:, None] % (1 << ells)  # (S, n) first token of each bucket
    t_abs = (p0 - r0)[:, None] + t_rel  # (S, W)
    lv = level_matrix(t_abs[:, :, None], s_abs[:, None, :]).clamp(max=L - 1)  # (S, W, n)
    w = torch.gather(lam.view(NC * C, H, L)[rows], 3, lv[:, :, None, :].expand(S, W, H, n))  # (S, W, H, n)
    w = w * Gl.view(NC * C, H)[rows].exp().to(dt)[..., None]  # rows outside the sequence: padding, dropped
    qh = qc.view(NC * C, G, K)[rows].repeat_interleave(H // G, dim=2).transpose(1, 2)  # (S, H, W, K)
    qs = qh @ low.permute(0, 2, 3, 1, 4).reshape(S, H, K, n * V)  # (S, H, W, n V)
    out = (qs.view(S, H, W, n, V) * w.transpose(1, 2)[..., None]).sum(3)  # (S, H, W, V)
    full = torch.zeros(S, H, C, V, dtype=dt, device=dev)
    full.scatter_(2, t_rel[:, None, :, None].expand(S, H, W, V), out)
    o_c.view(NC, -1).index_add_(0, hc, full.flatten(1))
    tail = Gl[hc, -1].exp().to(dt)[:, :, None, None] * low.sum(1)  # (S, H, K, V) decayed to the chunk's end
    summ.view(summ.shape[0], -1).index_add_(0, hc, tail.flatten(1))


@dataclass
class _TreeLevel:
    """Blocks of 2^(m-1) chunks at chunk level m, sequence by sequence, in absolute block order."""

    m: int
    vals: torch.Tensor  # (Nm, H, K, V) block summaries decayed to their reference token
    gref: torch.Tensor  # (Nm, H) float64 cumulative log-decay at the reference token
    off: torch.Tensor  # (S,) first node of each sequence
    bmin: torch.Tensor  # (S,) absolute block index of that node

    def node(self, seq: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
        """Node of the level-m bucket of a query in absolute chunk ``chunk`` (whose bit m-1 is set)."""
        return self.off[seq] + (chunk >> (self.m - 1)) - 1 - self.bmin[seq]


def _tree_level(m: int, prev: _TreeLevel | None, summ: torch.Tensor, merged: _Merged | None,
                Gtok: torch.Tensor, lay: _Layout, C: int) -> _TreeLevel:
    """Level m of the block tree: every block that a query of the sequence reads at level m.

    A sequence's nodes are the blocks b_first - 1 .. (jl >> (m-1)) - 1, where b_first = j0 >> (m-1): the
    block before b_first is the initial state's level log2(C) + m when b_first is odd, and is absent
    otherwise. Level 1 nodes are chunk summaries; a node at level m > 1 merges its two children.
    Each block is decayed to its last token, or to the token before the sequence's first when it ends
    earlier (the initial state's blocks).
    """
    LOG = C.bit_length() - 1
    dev = summ.device
    S = lay.p0.numel()
    b_first = lay.j0 >> (m - 1)
    has_init = b_first & 1 if merged is not None else torch.zeros_like(b_first)
    bmin = b_first - has_init
    cnt = ((lay.jl >> (m - 1)) - bmin).clamp(min=0)
    off = cnt.cumsum(0) - cnt
    ns = torch.repeat_interleave(torch.arange(S, device=dev), cnt)  # (Nm,)
    nb = bmin[ns] + torch.arange(ns.numel(), device=dev) - off[ns]  # (Nm,) absolute block index
    u = ((nb + 1) << (m - 1 + LOG)) - 1 - lay.j0[ns] * C  # last token, from the sequence's first chunk
    gref = torch.where((u >= 0)[:, None], Gtok[lay.co[ns] * C + u.clamp(min=0)], 0.0)
    vals = torch.empty(ns.numel(), *summ.shape[1:], dtype=summ.dtype, device=dev)
    init = nb < b_first[ns]
    if bool(init.any()):
        vals[init] = merged.get(ns[init], torch.full_like(nb[init], LOG + m))
    own, so, bo = ~init, ns[~init], nb[~init]
    if m == 1:
        vals[own] = summ[lay.co[so] + bo - lay.j0[so]]
    else:
        left = prev.off[so] + 2 * bo - prev.bmin[so]
        decay = (gref[own] - prev.gref[left]).exp().to(summ.dtype)
        vals[own] = prev.vals[left] * decay[..., None, None] + prev.vals[left + 1]
    return _TreeLevel(m, vals, gref, off, bmin)


def _inter(m: int, tree: _TreeLevel, qc: torch.Tensor, lam: torch.Tensor, Gtok_c: torch.Tensor,
           o_c: torch.Tensor, lay: _Layout, nb: int) -> None:
    """Add level log2(C) + m (one block per query chunk with bit m-1 set) to o_c, in place.

    Args:
        qc: [NC, C, G, K] (scaled); lam: [NC, C, H, L]; Gtok_c: [NC, C, H] float64; o_c: [NC, H, C, V].
    """
    LOG = qc.shape[1].bit_length() - 1
    G, H = qc.shape[2], lam.shape[2]
    chunks = (((lay.ch_j >> (m - 1)) & 1) == 1).nonzero().squeeze(1)
    lam_m = lam[:, :, :, LOG + m]  # (NC, C, H)
    o_flat = o_c.view(o_c.shape[0], -1)
    for part in chunks.split(nb):
        node = tree.node(lay.ch_seq[part], lay.ch_j[part])
        decay = (Gtok_c.index_select(0, part) - tree.gref.index_select(0, node)[:, None]).exp()
        w = lam_m.index_select(0, part) * decay.to(lam.dtype)  # (p, C, H)
        qw = qc.index_select(0, part).repeat_interleave(H // G, dim=2) * w[..., None]  # (p, C, H, K)
        out = qw.transpose(1, 2) @ tree.vals.index_select(0, node)  # (p, H, C, V)
        o_flat.index_add_(0, part, out.flatten(1))


def _final_high(m: int, tree: _TreeLevel, Gtok: torch.Tensor, final: torch.Tensor, act: torch.Tensor,
                lay: _Layout, C: int) -> None:
    """Final level log2(C) + m of each sequence whose last position's chunk has bit m-1 set."""
    LOG = C.bit_length() - 1
    ss = (((lay.jl >> (m - 1)) & 1) == 1).nonzero().squeeze(1)
    node = tree.node(ss, lay.jl[ss])
    Gy = Gtok[lay.co[ss] * C + lay.end[ss] - 1 - lay.j0[ss] * C]  # (s, H)
    final[act[ss], LOG + m] = tree.vals[node] * (Gy - tree.gref[node]).exp().to(final.dtype)[..., None, None]


def _final_low(final: torch.Tensor, act: torch.Tensor, merged: _Merged | None, kc: torch.Tensor,
               vc: torch.Tensor, Gl: torch.Tensor, lay: _Layout, nlow: int) -> None:
    """Final levels 0..nlow: the buckets inside the last chunk (and, when that chunk is also the first,
    the initial state's low levels), added in place.

    Args:
        final: [N, L, H, K, V]; kc: [NC, C, G, K]; vc: [NC, C, H, V]; Gl: [NC, C, H] float64.
    """
    NC, C, G, K = kc.shape
    H, V = vc.shape[2:]
    L = final.shape[1]
    dev, dt = kc.device, final.dtype
    lc = lay.co + lay.jl - lay.j0  # (S,) grid index of the last chunk
    y = lay.end - 1
    yl = y - lay.jl * C  # (S,) index of the last token in its chunk
    Gy = Gl[lc, yl]  # (S, H)
    k_rows, v_rows, G_rows = kc.view(NC * C, G, K), vc.view(NC * C, H, V), Gl.view(NC * C, H)
    for l in range(nlow + 1):  # bucket l of y is the 2^(l-1) tokens from y - y mod 2^l (l = 0: y itself)
        width = 1 << max(l - 1, 0)
        first = yl if l == 0 else yl - yl % (1 << l)
        rows = (lc * C + first)[:, None] + torch.arange(width, device=dev)  # (S, width)
        live = torch.ones_like(yl) if l == 0 else (yl >> (l - 1)) & 1  # (S,) bucket non-empty
        decay = (Gy[:, None] - G_rows[rows]).exp().to(dt) * live[:, None, None]  # (S, width, H)
        kd = k_rows[rows].repeat_interleave(H // G, dim=2) * decay[..., None]  # (S, width, H, K)
        final[act, l] = kd.permute(0, 2, 3, 1) @ v_rows[rows].transpose(1, 2)  # (S, H, K, V)
    if merged is None or nlow == 0:
        return
    ss = ((lay.jl == lay.j0) & (lay.p0 % C != 0)).nonzero().squeeze(1)
    if ss.numel() == 0:
        return
    ells = torch.arange(1, nlow + 1, device=dev)
    s_first = lay.p0[ss, None] - lay.p0[ss, None] % (1 << ells)  # (s, nlow)
    target = level_matrix(y[ss, None], s_first)  # (s, nlow)
    low = merged.get(ss.repeat_interleave(nlow), ells.repeat(ss.numel())).view(-1, nlow, H, K, V)
    contrib = low * Gy[ss].exp().to(dt)[:, None, :, None, None]  # (s, nlow, H, K, V)
    final.view(-1, H, K, V).index_add_(0, (act[ss, None] * L + target).flatten(), contrib.flatten(0, 1))
