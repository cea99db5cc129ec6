"""The token window in PyTorch (layout in ``state.py``): the windowed decode step's reference and its
CPU path, and the prefill's writer of each sequence's last block.

A windowed step reads the live high levels and the window's rows, stores one token, and once every W
steps folds the finished block into a level block: 3.6x fewer bytes than the deferred step at positions
512-638 (``state.window_step_traffic`` against ``state.step_level_blocks``). ``window_triton.py`` holds
the fast paths of ``fused_recurrent_step_window`` and ``write_window_ref``.
"""

from __future__ import annotations

import torch

from .naive import recurrent_step
from .pool_torch import window_block, window_levels, windowed_levels
from .state import BW, W, WindowRows, bitlen, check_pool_levels, check_shapes, ctz


def append_token(window: tuple[torch.Tensor, ...], slots: torch.Tensor, positions: torch.Tensor,
                 k: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> None:
    """Store token ``positions`` (k [N, G, K], v [N, H, V], g [N, H]) as its block's next row."""
    win_k, win_v, win_g = window
    t = positions.to(slots.device).long()
    buf, row = (t >> BW) % 2, t % W
    prev = win_g[slots, buf, (row - 1).clamp(min=0)]  # (N, H)
    win_k[slots, buf, row] = k.to(win_k.dtype)
    win_v[slots, buf, row] = v.to(win_v.dtype)
    win_g[slots, buf, row] = torch.where((row > 0)[:, None], prev + g.to(win_g.dtype), 0.0)


def fused_recurrent_step_window_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                    level_scales: torch.Tensor, levels: torch.Tensor,
                                    level_decay: torch.Tensor, window: tuple[torch.Tensor, ...],
                                    slots: torch.Tensor, positions: torch.Tensor,
                                    scale: float | None = None) -> torch.Tensor:
    """``kernels.naive.fused_recurrent_step_ref`` on a windowed pool: S from the blocks and the window,
    one recurrence step, the high levels written back as S (log-decay 0), the token appended."""
    check_shapes(q, k, v, g, level_scales)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    slots, t = slots.long(), positions.to(slots.device).long()
    dt = torch.float64 if levels.dtype == torch.float64 else torch.float32
    S = windowed_levels(levels, level_decay, window, slots, t, dt)
    o, new = recurrent_step(S, q, k, v, g, level_scales, t, scale)
    levels[slots] = new[:, BW + 1:].to(levels.dtype)
    level_decay[slots, (t + 1) % 2] = 0.0
    append_token(window, slots, t, k, v, g)
    return o.to(v.dtype)


def fused_recurrent_step_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                                level_scales: torch.Tensor, levels: torch.Tensor, level_decay: torch.Tensor,
                                window: tuple[torch.Tensor, ...], slots: torch.Tensor,
                                positions: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The windowed step as the fast paths do it: the query reads its block's rows and the live high
    levels; the high levels are read, never rewritten, except that at a block's first token the finished
    block and the levels BW+1..z fold into level z + 1."""
    rep, L = check_shapes(q, k, v, g, level_scales)
    LO = check_pool_levels(levels, L, window)  # block b of a slot is level LO + b
    LS = L - LO
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    slots, t = slots.long(), positions.to(slots.device).long()
    N, G, K = q.shape
    H, V = v.shape[1:]
    dt = torch.float64 if levels.dtype == torch.float64 else torch.float32
    dev = levels.device
    qh = q.to(dt).repeat_interleave(rep, dim=1) * scale  # (N, H, K)
    kh = k.to(dt).repeat_interleave(rep, dim=1)
    vd, gd, lam = v.to(dt), g.to(dt), level_scales.to(dt)

    # the query's own block: rows 0..row-1 of buffer (t >> BW) % 2, then the token itself
    block, row = t >> BW, t % W
    wk, wv, wg = window_block(*window, slots, block)
    j = torch.arange(W, device=dev)
    valid = j[None] < row[:, None]  # (N, W)
    g_prev = wg.gather(1, (row - 1).clamp(min=0)[:, None, None].expand(N, 1, H))[:, 0].to(dt)  # (N, H)
    g_t = torch.where((row > 0)[:, None], g_prev + gd, 0.0)  # gc of token t
    lev = bitlen((t[:, None] ^ ((block << BW)[:, None] + j)).clamp(min=0))  # (N, W): 1..BW where valid
    lam_rows = lam.gather(2, lev[:, None, :].expand(N, H, W)).transpose(1, 2)  # (N, W, H)
    w = torch.where(valid[..., None], lam_rows * torch.exp(g_t[:, None] - wg.to(dt)), 0.0)  # (N, W, H)
    kw = torch.where(valid[..., None, None], wk.to(dt), 0.0).repeat_interleave(rep, dim=2)  # (N, W, H, K)
    vw = torch.where(valid[..., None, None], wv.to(dt), 0.0)
    scores = torch.einsum("nhk,nwhk->nwh", qh, kw) * w
    o = torch.einsum("nwh,nwhv->nhv", scores, vw) + (lam[..., 0] * (qh * kh).sum(-1))[..., None] * vd

    # high levels
    z = ctz(t)
    lv = torch.arange(L, device=dev)
    bit = (t[:, None] >> (lv - 1).clamp(min=0)) & 1
    fold_step = (row == 0) & (t > 0)  # (N,): the finished block (and levels BW+1..z) fold into z + 1
    a_old = level_decay[slots, t % 2].to(dt)  # (N, L, H)
    high = lv > BW
    folded = high & (lv <= z[:, None]) & fold_step[:, None]
    keep = high & (bit == 1) & ~(fold_step[:, None] & (lv <= (z + 1)[:, None]))
    a_new = torch.where(keep[..., None], a_old + gd[:, None], float("-inf"))
    if bool(fold_step.any()):
        f = fold_step.nonzero()[:, 0]
        carry = window_levels(*window, slots[f], t[f], dt).sum(1)  # S[0..BW] at t, before token t's decay
        flat = levels.view(-1, H, K, V)
        fl = folded[f]
        n_f, l_f = fl.nonzero(as_tuple=True)
        if n_f.numel():
            blocks = flat[slots[f][n_f] * LS + l_f - LO].to(dt) * a_old[f][n_f, l_f].exp()[..., None, None]
            carry.index_add_(0, n_f, blocks)
        flat[slots[f] * LS + z[f] + 1 - LO] = carry.to(levels.dtype)
        a_new[f, z[f] + 1] = gd[f]
        o[f] += (lam[f, :, z[f] + 1] * gd[f].exp())[..., None] * torch.einsum("nhk,nhkv->nhv", qh[f], carry)
    n_k, l_k = keep.nonzero(as_tuple=True)
    if n_k.numel():
        blocks = levels.view(-1, H, K, V)[slots[n_k] * LS + l_k - LO].to(dt)  # (R, H, K, V)
        wk_ = lam[n_k, :, l_k] * a_new[n_k, l_k].exp()  # (R, H)
        o.index_add_(0, n_k, wk_[..., None] * torch.einsum("rhk,rhkv->rhv", qh[n_k], blocks))
    level_decay[slots, 1 - t % 2] = a_new.to(level_decay.dtype)
    append_token(window, slots, t, k, v, g)
    return o.to(v.dtype)


def write_window_ref(window: tuple[torch.Tensor, ...], rows: WindowRows, k: torch.Tensor, v: torch.Tensor,
                     g: torch.Tensor) -> None:
    """After a prefill: each sequence's last block into its window (k [T, G, K], v [T, H, V], g [T, H]
    of the packed rows); rows already there from earlier calls stay, their gc continues."""
    win_k, win_v, win_g = window
    N, H = rows.first.numel(), g.shape[-1]
    dev = g.device
    seq = torch.repeat_interleave(torch.arange(N, device=dev), rows.count)  # (M,) one entry per row written
    offs = torch.arange(seq.numel(), device=dev) - (rows.count.cumsum(0) - rows.count)[seq]
    row, src, slot, buf = rows.first[seq] + offs, rows.src[seq] + offs, rows.slot[seq], rows.buf[seq]
    base = win_g[rows.slot, rows.buf, (rows.first - 1).clamp(min=0)]  # (N, H), before the writes
    base = torch.where((rows.first > 0)[:, None], base, 0.0)
    inc = torch.where((row > 0)[:, None], g[src].float(), 0.0)  # (M, H)
    dense = torch.zeros(N, W, H, dtype=torch.float32, device=dev)
    dense[seq, row] = inc
    gc = base[seq] + dense.cumsum(1)[seq, row]
    win_k[slot, buf, row] = k[src].to(win_k.dtype)
    win_v[slot, buf, row] = v[src].to(win_v.dtype)
    win_g[slot, buf, row] = gc.to(win_g.dtype)
