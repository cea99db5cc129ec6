"""The low Fenwick levels kept as a window of raw tokens: reference, PyTorch decode path, prefill writer.

At position t (tokens absorbed), levels 0..BW (BW = 5) hold exactly the tokens of the aligned W-token
block (W = 2^BW = 32) of the last token t - 1: bitlen((t - 1) ^ s) <= BW. A window keeps those tokens
raw instead of as K x V blocks, per slot:

    win_k [P, 2, W, G, K], win_v [P, 2, W, H, V] (any float dtype),
    win_g [P, 2, W, H] float32: gc[j] = g[B W + 1] + ... + g[B W + j], the log-decay since the block's
        first token (gc[0] = 0),

in two buffers by block parity (block B in buffer B % 2), so a step that starts a block writes one
buffer while it folds the other. Levels above BW stay blocks with deferred decay (``level_decay``,
kernels.naive.fused_recurrent_step_ref). A step reads the live high levels and the window's rows, stores
one token, and once every W steps folds the finished block into a level block: 3.6x fewer bytes than
the deferred step at positions 512-638 (``window_step_traffic`` against ``step_level_blocks``). The
engine uses it with ``token_window=True`` (the default; H200 timings in docs/kernels-notes.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .naive import check_shapes, recurrent_step
from .state import bitlen, ctz, true_levels

BW = 5
W = 1 << BW


def window_step_traffic(t: int) -> tuple[int, int, int]:
    """(level blocks read, level blocks written, window rows read) per head by the windowed step at
    position t, for the benches' byte counts (``kernels.state.step_level_blocks`` is the block layout's).

    Within a block (t % W > 0): the rows 0..t%W-1 of the token's block and the live levels above BW
    (bit l - 1 of t set); nothing but the token's row is written. At a block's first token: the W rows
    of the finished block, the levels BW+1..z (z = ctz(t)) folded with it and the live levels above
    z + 1; level z + 1 is written.
    """
    row = t % W
    if t == 0 or row:
        return bin(t >> BW).count("1"), 0, row
    z = (t & -t).bit_length() - 1
    return z - BW + bin(t >> (z + 1)).count("1"), 1, W


def check_pool_levels(levels: torch.Tensor, num_levels: int, window: tuple | None) -> int:
    """The first level a pool stores as blocks: BW + 1 with a token window (levels 0..BW are its tokens;
    the pool is [P, num_levels - BW - 1, H, K, V]), else 0 (all num_levels)."""
    low = BW + 1 if window is not None else 0
    if levels.dim() != 5 or levels.shape[1] != num_levels - low:
        raise ValueError(f"a pool of {num_levels} levels{' with a token window' if low else ''} stores "
                         f"{num_levels - low} level blocks per slot, got levels {tuple(levels.shape)}")
    return low


def _rows(win_k, win_v, win_g, slots, block):
    """The window buffer of ``block`` [N] per slot: k (N, W, G, K), v (N, W, H, V), gc (N, W, H)."""
    buf = block % 2
    return win_k[slots, buf], win_v[slots, buf], win_g[slots, buf]


def window_levels(win_k: torch.Tensor, win_v: torch.Tensor, win_g: torch.Tensor, slots: torch.Tensor,
                  positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """S[0..BW] of ``slots`` at ``positions`` from their windows: [N, BW + 1, H, K, V] in ``dtype``
    (rows past the block's last token are ignored, whatever they hold)."""
    slots, t = slots.long(), positions.to(slots.device).long()
    last = t - 1
    block = last.clamp(min=0) >> BW
    n = t - (block << BW)  # rows held: 1..W, 0 at position 0
    k, v, gc = _rows(win_k, win_v, win_g, slots, block)
    N, _, G, K = k.shape
    H = v.shape[2]
    j = torch.arange(W, device=k.device)
    valid = j[None] < n[:, None]  # (N, W)
    s = (block << BW)[:, None] + j  # positions of the rows
    lev = torch.where(s == last[:, None], 0, bitlen((last[:, None] ^ s).clamp(min=0)))  # (N, W)
    g_last = gc.gather(1, (n - 1).clamp(min=0)[:, None, None].expand(N, 1, H)).to(dtype)  # (N, 1, H)
    w = torch.where(valid[..., None], torch.exp(g_last - gc.to(dtype)), 0.0)  # (N, W, H)
    kh = torch.where(valid[..., None, None], k.to(dtype), 0.0).repeat_interleave(H // G, dim=2)  # (N,W,H,K)
    vd = torch.where(valid[..., None, None], v.to(dtype), 0.0)
    out = torch.zeros(N, BW + 1, H, K, v.shape[-1], dtype=dtype, device=k.device)
    for level in range(BW + 1):
        wl = w * (lev == level)[..., None]
        out[:, level] = torch.einsum("nwh,nwhk,nwhv->nhkv", wl, kh, vd)
    return out


def windowed_levels(levels: torch.Tensor, level_decay: torch.Tensor, window: tuple[torch.Tensor, ...],
                    slots: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype = torch.float32
                    ) -> torch.Tensor:
    """Every level S of ``slots`` at ``positions``: [N, L, H, K, V], the high ones from the blocks
    (levels [P, L - BW - 1, H, K, V]: a windowed pool stores levels BW+1.. only) and their deferred decay
    (level_decay [P, 2, L, H]), levels 0..BW from the window."""
    L = level_decay.shape[2]
    check_pool_levels(levels, L, window)
    high = true_levels(levels, level_decay[:, :, BW + 1:], slots, positions, dtype)
    return torch.cat([window_levels(*window, slots, positions, dtype), high], dim=1)


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
    wk, wv, wg = _rows(*window, slots, block)
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


@dataclass
class WindowRows:
    """Where a prefill's packed rows land in the windows: the rows of each sequence's last block."""

    src: torch.Tensor  # [M] packed row
    seq: torch.Tensor  # [M] sequence index
    slot: torch.Tensor  # [M]
    buf: torch.Tensor  # [M] block parity
    row: torch.Tensor  # [M] row in the block
    first: torch.Tensor  # [N] first row written per sequence (> 0: the block began before this call)
    seq_slot: torch.Tensor  # [N]
    seq_buf: torch.Tensor  # [N]
    seq_count: torch.Tensor  # [N] rows written per sequence
    seq_src: torch.Tensor  # [N] packed row of the first of them


def window_rows(starts: list[int], lens: list[int], slots: torch.Tensor) -> WindowRows:
    """The plan of ``write_window`` for sequences continuing from ``starts`` (host values) by ``lens``
    tokens into ``slots`` (a device tensor): one upload, no read-back."""
    return window_plan(starts, lens, slots.device).bind(slots)


@dataclass(frozen=True)
class WindowPlan:
    """``WindowRows`` before the slots are known: the host-built rows, on the device. ``bind`` adds the
    slots with device ops only, so a CUDA graph can capture it over a static slots buffer."""

    rows: tuple[torch.Tensor, ...]  # src, seq, buf, row [M]; first, seq_buf, count, seq_src [N]

    def bind(self, slots: torch.Tensor) -> WindowRows:
        src, seq, buf, row, first, seq_buf, count, seq_src = self.rows
        slots = slots.long()
        return WindowRows(src, seq, slots[seq], buf, row, first, slots, seq_buf, count, seq_src)


def window_plan(starts: list[int], lens: list[int], device: torch.device) -> WindowPlan:
    """``window_rows`` without the slots: one upload (pinned and queued on CUDA: no wait)."""
    src, seq, buf, row, first, seq_buf, count, seq_src = [], [], [], [], [], [], [], []
    bos = 0
    for i, (s, n) in enumerate(zip(starts, lens, strict=True)):
        end = s + n
        block = (end - 1) >> BW
        lo = max(s, block << BW)
        src += [bos + q - s for q in range(lo, end)]
        row += [q - (block << BW) for q in range(lo, end)]
        seq += [i] * (end - lo)
        buf += [block % 2] * (end - lo)
        first.append(lo - (block << BW))
        seq_buf.append(block % 2)
        count.append(end - lo)
        seq_src.append(bos + lo - s)
        bos += n

    def up(rows: list[list[int]]) -> tuple[torch.Tensor, ...]:
        t = torch.tensor(rows, dtype=torch.int64)
        t = t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)
        return t.unbind(0)

    return WindowPlan((*up([src, seq, buf, row]), *up([first, seq_buf, count, seq_src])))


def write_window(window: tuple[torch.Tensor, ...], rows: WindowRows, k: torch.Tensor, v: torch.Tensor,
                 g: torch.Tensor) -> None:
    """``write_window_ref`` on the CPU, one Triton launch on CUDA (``kernels.pool_triton``)."""
    if k.is_cuda:
        try:
            from .pool_triton import write_window_triton
        except ImportError:
            pass
        else:
            return write_window_triton(window, rows, k, v, g)
    return write_window_ref(window, rows, k, v, g)


def write_window_ref(window: tuple[torch.Tensor, ...], rows: WindowRows, k: torch.Tensor, v: torch.Tensor,
                     g: torch.Tensor) -> None:
    """After a prefill: each sequence's last block into its window (k [T, G, K], v [T, H, V], g [T, H]
    of the packed rows); rows already there from earlier calls stay, their gc continues."""
    win_k, win_v, win_g = window
    N, H = rows.first.numel(), g.shape[-1]
    base = win_g[rows.seq_slot, rows.seq_buf, (rows.first - 1).clamp(min=0)]  # (N, H), before the writes
    base = torch.where((rows.first > 0)[:, None], base, 0.0)
    inc = torch.where((rows.row > 0)[:, None], g[rows.src].float(), 0.0)  # (M, H)
    dense = torch.zeros(N, W, H, dtype=torch.float32, device=g.device)
    dense[rows.seq, rows.row] = inc
    gc = base[rows.seq] + dense.cumsum(1)[rows.seq, rows.row]
    win_k[rows.slot, rows.buf, rows.row] = k[rows.src].to(win_k.dtype)
    win_v[rows.slot, rows.buf, rows.row] = v[rows.src].to(win_v.dtype)
    win_g[rows.slot, rows.buf, rows.row] = gc.to(win_g.dtype)
