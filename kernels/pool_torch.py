"""The state of sequences read from the engine's pool, in PyTorch: the specification of
``pool_triton.py`` and the CPU path.

The engine stores each slot's Fenwick levels with their decay deferred (``level_decay``) and, with a
token window, the low levels as raw tokens (``state.py``). A prefill that continues sequences needs
their levels S as the first query sees them, merged (``merge_for_query``) and summed over levels: the
chunk kernel's initial state. ``merged_levels_ref`` is the specification of the one-launch
``pool_triton.pooled_merged_levels``.
"""

from __future__ import annotations

import torch

from .state import BW, FenwickState, PooledState, W, bitlen, check_pool_levels, true_levels


def window_block(win_k: torch.Tensor, win_v: torch.Tensor, win_g: torch.Tensor, slots: torch.Tensor,
                 block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
    k, v, gc = window_block(win_k, win_v, win_g, slots, block)
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


def pooled_levels(state: PooledState, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The levels S of the state's N sequences at their positions: [N, L, H, K, V] in ``dtype``."""
    if state.window is not None:
        return windowed_levels(state.levels, state.decay, state.window, state.slots, state.positions, dtype)
    return true_levels(state.levels, state.decay, state.slots, state.positions, dtype)


def merge_for_query(levels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Levels as the query at ``positions`` sees them: S[z+1] += S[0..z], S[0..z] = 0, z = ctz(position)
    (nothing moves at position 0; a carry past the top level lands in it). [N, L, H, K, V] float32
    (float64 stays)."""
    levels = levels if levels.dtype == torch.float64 else levels.float()
    L = levels.shape[1]
    pos = positions.to(levels.device, torch.int64)
    low = pos & -pos  # a power of two: log2 is exact, and no host round trip (ctz would make one)
    z = torch.where(pos > 0, torch.log2(low.clamp(min=1).double()).round().long(), -1)  # (N,) ctz
    lidx = torch.arange(L, device=levels.device)
    merge = (lidx[None, :] <= z[:, None]).to(levels.dtype)  # (N, L)
    carry = torch.einsum("nl,nlhkv->nhkv", merge, levels)
    target = torch.nn.functional.one_hot((z + 1).clamp(0, L - 1), L).to(levels.dtype) * (z[:, None] >= 0)
    return levels * (1 - merge)[:, :, None, None, None] + target[:, :, None, None, None] * carry[:, None]


def merged_levels_ref(state: PooledState) -> tuple[torch.Tensor, torch.Tensor]:
    """(merged [N, L, H, K, V], its cumulative sum over levels) float32: the chunk kernel's initial state."""
    merged = merge_for_query(pooled_levels(state), state.positions)
    return merged, merged.cumsum(1)


def initial_levels(state: FenwickState | PooledState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The levels S [N, L, H, K, V] of an initial state (a pooled one converted, in float32 by default)."""
    if isinstance(state, PooledState):
        return pooled_levels(state, dtype or torch.float32)
    return state.levels if dtype is None else state.levels.to(dtype)
