"""Chunked log-linear attention for training: O(T·C) memory, plain PyTorch ops, autograd for the backward.

Same contract as ``kernels.naive.log_linear_attn`` (DESIGN §1). The sequence is cut into chunks of C
(a power of two) and padded to a power-of-two number of chunks. Then

- inside a chunk, level(t, s) = bitlen((t mod C) ^ (s mod C)): a C × C quadratic block per chunk, with λ
  spread over the block by a constant one-hot level table;
- across chunks, level(t, s) = log2(C) + bitlen(chunk(t) ^ chunk(s)): Fenwick level log2(C) + ℓ of a query
  in chunk c is the aligned block of 2^(ℓ-1) chunks just before c's own aligned block of that size, and
  exists when c is in the second half of its aligned block of 2^ℓ chunks. So for each ℓ, viewing the
  chunks as pairs of halves of 2^(ℓ-1) chunks, every query of a second half reads one matrix, the decayed
  sum of the first half's chunk states: a reshape and a batched matmul, no gather.

Those half-block sums are built bottom-up (a segment tree over chunks, merged with the decay between
their ends). Cost per head: T·C·(K+V) inside chunks, T·K·V·(1 + log2(T/C)/2) across them. Decays are
always exp of a non-positive difference of cumulative log-decays, so nothing overflows.
"""

from __future__ import annotations

import functools

import torch


def _bitlen(x: torch.Tensor) -> torch.Tensor:
    """bitlen of non-negative int64 x (0 -> 0)."""
    out = torch.zeros_like(x)
    y = x.clone()
    while bool((y > 0).any()):
        out += (y > 0).long()
        y = y >> 1
    return out


def levels_needed(T: int) -> int:
    """Levels that positions 0..T-1 use: bitlen(T - 1) + 1."""
    return max(T - 1, 0).bit_length() + 1


@functools.lru_cache(maxsize=16)
def _intra_onehot(C: int, device: torch.device) -> torch.Tensor:
    """[C, log2(C) + 1, C] float32: 1 where level(t, s) == l and s <= t, for t, s in one chunk."""
    pos = torch.arange(C, device=device)
    lvl = _bitlen(pos[:, None] ^ pos[None, :])  # (C, C)
    causal = pos[:, None] >= pos[None, :]
    onehot = torch.nn.functional.one_hot(lvl, C.bit_length()).float() * causal[..., None]  # (C, S, l)
    return onehot.permute(0, 2, 1).contiguous()  # (C, l, S)


def chunked_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                            level_scales: torch.Tensor, scale: float | None = None,
                            chunk_size: int = 64) -> torch.Tensor:
    """Differentiable log-linear attention in chunks (see the module docstring).

    Args:
        q, k: [B, T, G, K]; v: [B, T, H, V]; g: [B, T, H] log-decay (<= 0);
        level_scales: [B, T, H, L] (λ; L >= bitlen(T - 1) + 1); scale: defaults to K ** -0.5;
        chunk_size: C, a power of two (sequences shorter than C take the next power of two above T).
    Returns:
        o: [B, T, H, V] in v's dtype. Under autocast the matmuls run in the autocast dtype; λ, decays and
        their products stay in float32 (float64 for float64 inputs).
    """
    B, T, G, K = q.shape
    H, V, L = v.shape[2], v.shape[3], level_scales.shape[-1]
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two, got {chunk_size}")
    C = min(chunk_size, 1 << max(T - 1, 0).bit_length())  # a short sequence is one chunk, unpadded
    if levels_needed(T) > L:
        raise ValueError(f"T={T} needs {levels_needed(T)} levels, level_scales has {L}")
    rep, cb = H // G, C.bit_length() - 1  # cb = log2(C)
    scale = K ** -0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    autocast = torch.is_autocast_enabled(q.device.type)
    out_dtype = v.dtype
    if not autocast:
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    Np = 1 << max(-(-T // C) - 1, 0).bit_length()  # chunks, padded to a power of two
    Tp, Lp = Np * C, cb + Np.bit_length()  # padded length and the levels it spans
    pad = Tp - T
    q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):
        lam = torch.nn.functional.pad(level_scales.to(dt), (0, max(Lp - L, 0), 0, 0, 0, pad))[..., :Lp]
        lam = lam.permute(0, 2, 1, 3).contiguous()  # (B, H, Tp, Lp): padded positions / levels get λ = 0
        Gc = torch.nn.functional.pad(g.to(dt), (0, 0, 0, pad)).cumsum(1)
        Gc = Gc.transpose(1, 2).contiguous()  # (B, H, Tp)
        Gch = Gc.view(B, H, Np, C)
        Gend = Gch[..., -1]  # (B, H, Np): cumulative log-decay at each chunk's last token
        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        decay_in = (Gch[..., :, None] - Gch[..., None, :]).masked_fill(~causal, float("-inf")).exp()
        onehot = _intra_onehot(C, q.device).to(dt)  # (C, cb + 1, S)
        lam_in = torch.einsum("bhntl,tls->bhnts", lam.view(B, H, Np, C, Lp)[..., :cb + 1], onehot)
        w_in = (lam_in * decay_in).view(B, G, rep, Np, C, C)  # (B, G, rep, Np, C, S)
        k_decay = (Gend[..., None] - Gch).exp().view(B, G, rep, Np, C, 1)  # to the chunk's end
    qc = q.view(B, Np, C, G, K).permute(0, 3, 1, 2, 4)  # (B, G, Np, C, K)
    kc = k.view(B, Np, C, G, K).permute(0, 3, 1, 2, 4)
    vc = v.view(B, Np, C, H, V).permute(0, 3, 1, 2, 4).reshape(B, G, rep, Np, C, V)
    scores = qc @ kc.transpose(-1, -2)  # (B, G, Np, C, S)
    o = (scores[:, :, None] * w_in) @ vc  # (B, G, rep, Np, C, V)
    o = o.reshape(B, H, Tp, V)
    if Np > 1:
        states = (kc[:, :, None] * k_decay).transpose(-1, -2) @ vc  # (B, G, rep, Np, K, V)
        o = o + _across_chunks(qc.reshape(B, G, Tp, K), states.reshape(B, H, Np, K, V), Gc, Gend, lam,
                               C, cb, rep)
    return (o[:, :, :T] * scale).transpose(1, 2).to(out_dtype)


def _across_chunks(q: torch.Tensor, nodes: torch.Tensor, Gc: torch.Tensor, ends: torch.Tensor,
                   lam: torch.Tensor, C: int, cb: int, rep: int) -> torch.Tensor:
    """Levels above the chunk: q [B, G, Tp, K]; nodes [B, H, Np, K, V] (chunk states decayed to their
    ends); Gc [B, H, Tp]; ends [B, H, Np] (Gc at each chunk's end); lam [B, H, Tp, Lp] -> [B, H, Tp, V]."""
    B, G, Tp, K = q.shape
    H, Np, _, V = nodes.shape[1:]
    out = None
    b = 1  # chunks per half block at level cb + ℓ
    while b < Np:
        n = Np // (2 * b)
        span = b * C
        qs = q.view(B, G, 1, n, 2, span, K)[:, :, :, :, 1]  # (B, G, 1, n, span, K): second halves
        first = nodes.view(B, G, rep, n, 2, K, V)[:, :, :, :, 0]  # (B, G, rep, n, K, V)
        r = (qs @ first).reshape(B, H, n, span, V)
        with torch.autocast(q.device.type, enabled=False):
            e_first = ends.view(B, H, n, 2)[..., 0]  # (B, H, n)
            g_second = Gc.view(B, H, n, 2, span)[:, :, :, 1]  # (B, H, n, span)
            lam_l = lam.view(B, H, n, 2, span, -1)[:, :, :, 1, :, cb + b.bit_length()]
            w = lam_l * (g_second - e_first[..., None]).exp()  # (B, H, n, span)
        part = torch.stack([torch.zeros_like(r), r * w[..., None]], dim=3)  # (B, H, n, 2, span, V)
        part = part.reshape(B, H, Tp, V)
        out = part if out is None else out + part
        if 2 * b < Np:  # merge pairs of nodes: the first decayed to the second's end
            with torch.autocast(q.device.type, enabled=False):
                pair_ends = ends.view(B, H, n, 2)
                hop = (pair_ends[..., 1] - pair_ends[..., 0]).exp()[..., None, None]  # (B, H, n, 1, 1)
                pairs = nodes.view(B, H, n, 2, K, V)
                nodes = pairs[:, :, :, 0] * hop + pairs[:, :, :, 1]  # (B, H, n, K, V)
                ends = pair_ends[..., 1]
        b *= 2
    return out
