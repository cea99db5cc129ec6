"""One decode token for a pool of sequences in PyTorch: the CPU path of ``fused_recurrent.py``.

Only live levels are read and written. Before token t (z = ctz(t)) the levels 0..z fold into z + 1,
the levels above z + 1 that hold a bucket (bit l-1 of t set) decay, level 0 takes k v^T, and levels 1..z
are emptied; every other level is empty before and after and is not touched. That is popcount(t) + 2
blocks read and written per sequence instead of L, and no copy of the pool.
"""

from __future__ import annotations

import torch

from .state import check_level_decay, check_shapes, ctz, max_positions


def fused_recurrent_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                         level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                         positions: torch.Tensor, scale: float | None = None, *,
                         level_decay: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token for N sequences held in a pool; updates ``levels[slots]`` in place.

    Same contract as ``kernels.naive.fused_recurrent_step_ref``. A sequence at position 0 starts from an
    empty state whatever its slot holds. With ``level_decay`` the live levels above z + 1 are not
    rewritten: their log-decay grows by g instead, and the step writes two blocks (level 0 and z + 1).

    Args:
        q, k: [N, G, K]; v: [N, H, V]; g: [N, H] log-decay; level_scales: [N, H, L];
        levels: [P, L, H, K, V] state pool (float32 or bfloat16; float64 in checks);
        slots: [N] int, distinct pool rows; positions: [N] int, tokens absorbed before this one.
        scale: defaults to K ** -0.5.
    Returns:
        o: [N, H, V] in v's dtype.
    """
    rep, L = check_shapes(q, k, v, g, level_scales)
    if q.dim() != 3:
        raise ValueError(f"q must be [N, G, K], got {tuple(q.shape)}")
    N, G, K = q.shape
    H, V = v.shape[1:]
    if levels.dim() != 5 or levels.shape[1:] != (L, H, K, V):
        raise ValueError(f"levels must be [P, {L}, {H}, {K}, {V}], got {tuple(levels.shape)}")
    if slots.shape != (N,) or positions.shape != (N,):
        raise ValueError(
            f"slots and positions must be [{N}], got {tuple(slots.shape)} and {tuple(positions.shape)}"
        )
    scale = K ** -0.5 if scale is None else scale
    dt = torch.float64 if torch.float64 in (q.dtype, levels.dtype) else torch.float32
    dev = levels.device
    if N == 0:
        return v.new_empty(0, H, V)
    t = positions.to(dev, torch.int64)
    slots = slots.to(dev, torch.int64)
    if int(t.min()) < 0 or int(t.max()) + 1 > max_positions(L):
        raise ValueError(
            f"sequence reaches {int(t.max()) + 1} tokens but {L} levels hold at most {max_positions(L)}"
        )
    if torch.unique(slots).numel() != N:
        raise ValueError("slots must be distinct")

    if level_decay is not None:
        check_level_decay(level_decay, levels)
        return _step_deferred(q, k, v, g, level_scales, levels, level_decay, slots, t, scale, rep, dt)
    z = ctz(t)  # (N,), -1 at position 0
    lv = torch.arange(L, device=dev)
    bit = (t[:, None] >> (lv - 1).clamp(min=0)) & 1  # (N, L): bit l-1 of t
    fold = lv <= z[:, None]  # (N, L): folded into z + 1
    keep = (lv > (z + 1)[:, None]) & (bit == 1) & (lv > 0)  # (N, L): live above z + 1, decay only
    clear = (lv > 0) & (fold | (t == 0)[:, None])  # (N, L): empty after this token
    row = slots[:, None] * L + lv  # (N, L): rows of the pool viewed as [P * L, H * K * V]
    n_fold, n_keep = fold.nonzero()[:, 0], keep.nonzero()[:, 0]
    F = n_fold.numel()
    old = _read(levels, torch.cat([row[fold], row[keep]])).to(dt).view(-1, H, K, V)  # (F + R, H, K, V)
    decay = g.to(dt).exp()  # (N, H)
    top = torch.zeros(N, H, K, V, dtype=dt, device=dev).index_add_(0, n_fold, old[:F])  # zero at position 0
    top.mul_(decay[..., None, None])
    kept = old[F:].mul_(decay[n_keep, :, None, None])  # (R, H, K, V)

    qh = q.to(dt).repeat_interleave(rep, dim=1) * scale  # (N, H, K)
    kh = k.to(dt).repeat_interleave(rep, dim=1)
    vd = v.to(dt)
    lam = level_scales.to(dt)
    rows = torch.arange(N, device=dev)
    o = (lam[..., 0] * (qh * kh).sum(-1))[..., None] * vd  # level 0: q . (k v^T) = (q . k) v
    o += lam[rows, :, z + 1, None] * torch.einsum("nhk,nhkv->nhv", qh, top)
    lam_kept = lam[n_keep, :, lv.expand(N, L)[keep], None]  # (R, H, 1)
    o.index_add_(0, n_keep, lam_kept * torch.einsum("rhk,rhkv->rhv", qh[n_keep], kept))

    _write(levels, row[clear], None)
    _write(levels, row[keep], kept)
    _write(levels, slots * L + z + 1, top)  # level 0 at position 0: overwritten next
    _write(levels, slots * L, kh[..., :, None] * vd[..., None, :])
    return o.to(v.dtype)


def _step_deferred(q, k, v, g, level_scales, levels, level_decay, slots, t, scale, rep, dt):
    """``fused_recurrent_step`` on a pool with deferred decay (S[l] = levels[l] * exp(a[l]))."""
    N, L, H, K, V = t.numel(), *levels.shape[1:]
    dev = levels.device
    z = ctz(t)  # (N,), -1 at position 0
    lv = torch.arange(L, device=dev)
    bit = (t[:, None] >> (lv - 1).clamp(min=0)) & 1  # (N, L): bit l-1 of t
    fold = lv <= z[:, None]  # (N, L): folded into z + 1 (none at position 0)
    keep = (lv > (z + 1)[:, None]) & (bit == 1) & (lv > 0)  # (N, L): live above z + 1, a += g only
    row = slots[:, None] * L + lv  # (N, L): rows of the pool viewed as [P * L, H * K * V]
    par = t % 2
    a_old = level_decay[slots, par].to(dt)  # (N, L, H)
    gd = g.to(dt)  # (N, H)
    n_fold = fold.nonzero()[:, 0]
    w_fold = a_old[fold].exp()  # (F, H): each folded level's true scale
    old = _read(levels, row[fold]).to(dt).view(-1, H, K, V) * w_fold[..., None, None]
    top = torch.zeros(N, H, K, V, dtype=dt, device=dev).index_add_(0, n_fold, old)  # true, before g

    a_new = torch.full_like(a_old, float("-inf"))
    a_new[keep] = a_old[keep] + gd[keep.nonzero()[:, 0]]
    rows = torch.arange(N, device=dev)
    a_new[rows[t > 0], (z + 1)[t > 0]] = gd[t > 0]  # the new level holds the carry as summed, owes g
    a_new[:, 0] = 0.0

    qh = q.to(dt).repeat_interleave(rep, dim=1) * scale  # (N, H, K)
    kh = k.to(dt).repeat_interleave(rep, dim=1)
    vd = v.to(dt)
    lam = level_scales.to(dt)  # (N, H, L)
    o = (lam[..., 0] * (qh * kh).sum(-1))[..., None] * vd  # level 0: q . (k v^T) = (q . k) v
    o += (lam[rows, :, z + 1] * gd.exp())[..., None] * torch.einsum("nhk,nhkv->nhv", qh, top)
    n_keep = keep.nonzero()[:, 0]
    kept = _read(levels, row[keep]).to(dt).view(-1, H, K, V)  # (R, H, K, V) as stored
    w_keep = lam[n_keep, :, lv.expand(N, L)[keep]] * a_new[keep].exp()  # (R, H)
    o.index_add_(0, n_keep, w_keep[..., None] * torch.einsum("rhk,rhkv->rhv", qh[n_keep], kept))

    _write(levels, slots * L + z + 1, top)  # at position 0 level 0, overwritten next
    _write(levels, slots * L, kh[..., :, None] * vd[..., None, :])
    level_decay[slots, 1 - par] = a_new.to(level_decay.dtype)
    return o.to(v.dtype)


def _read(levels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the pool viewed as [P * L, H * K * V]."""
    L = levels.shape[1]
    if levels.is_contiguous():
        return levels.view(-1, levels[0, 0].numel()).index_select(0, rows)
    return levels[rows // L, rows % L].flatten(1)


def _write(levels: torch.Tensor, rows: torch.Tensor, blocks: torch.Tensor | None) -> None:
    """Write blocks [R, H, K, V] (zeros when None) to rows of the pool viewed as [P * L, H * K * V]."""
    L = levels.shape[1]
    if blocks is not None:
        blocks = blocks.to(levels.dtype)
    if levels.is_contiguous():
        flat = levels.view(-1, levels[0, 0].numel())
        if blocks is None:
            flat.index_fill_(0, rows, 0)
        else:
            flat.index_copy_(0, rows, blocks.flatten(1))
    elif blocks is None:
        levels[rows // L, rows % L] = 0
    else:
        levels[rows // L, rows % L] = blocks
