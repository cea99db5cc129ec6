"""Data layout and validation shared by every op: the Fenwick state, the engine's pooled state, the
token window's constants and host plan, level arithmetic and the shape checks.

A leaf: it imports numpy and torch only. ``naive.py`` is the specification built on it; the ``*_torch.py`` and
``*_triton.py`` modules are the two implementations of each op.

The token window (``window_torch.py``, ``window_triton.py``): at position t (tokens absorbed), levels
0..BW hold exactly the tokens of the aligned W-token block of the last token t - 1 (bitlen((t - 1) ^ s)
<= BW). A windowed pool keeps those tokens raw instead of as K x V blocks, per slot:

    win_k [P, 2, W, G, K], win_v [P, 2, W, H, V] (any float dtype),
    win_g [P, 2, W, H] float32: gc[j] = g[B W + 1] + ... + g[B W + j], the log-decay since the block's
        first token (gc[0] = 0),

in two buffers by block parity (block B in buffer B % 2), so a step that starts a block writes one
buffer while it folds the other; levels above BW stay blocks with deferred decay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BW = 5  # levels 0..BW of a windowed pool are its last block's tokens
W = 1 << BW  # tokens in a window block


@dataclass
class FenwickState:
    """Fenwick state of N sequences.

    levels: [N, L, H, K, V] float32 (float64 in fp64 checks); ``levels[n, l]`` is ``S[l]`` of the
        recurrence for sequence n after ``positions[n]`` tokens.
    positions: [N] int64, the number of tokens absorbed so far.
    """

    levels: torch.Tensor  # (N, L, H, K, V)
    positions: torch.Tensor  # (N,)

    def __post_init__(self) -> None:
        if self.levels.dim() != 5:
            raise ValueError(f"FenwickState.levels must be [N, L, H, K, V], got {tuple(self.levels.shape)}")
        if self.positions.shape != (self.levels.shape[0],):
            raise ValueError(
                f"FenwickState.positions must be [N={self.levels.shape[0]}], "
                f"got {tuple(self.positions.shape)}"
            )

    @classmethod
    def zeros(cls, n: int, num_levels: int, num_heads: int, k_dim: int, v_dim: int, *,
              device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> FenwickState:
        levels = torch.zeros(n, num_levels, num_heads, k_dim, v_dim, device=device, dtype=dtype)
        return cls(levels, torch.zeros(n, dtype=torch.int64, device=device))

    def clone(self) -> FenwickState:
        return FenwickState(self.levels.clone(), self.positions.clone())


@dataclass
class PooledState:
    """The state of N sequences where the engine keeps it.

    levels: [P, L, H, K, V] pool (any float dtype), stored with the decay deferred; with a window only
        levels BW+1..L-1 are blocks ([P, L - BW - 1, H, K, V], ``check_pool_levels``);
    decay: [P, 2, L, H] float32, the log-decay each stored level owes (-inf: empty);
    slots, positions: [N] int64 on the pool's device; window: (win_k, win_v, win_g) of the pool, or None.
    """

    levels: torch.Tensor
    decay: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                 level_scales: torch.Tensor) -> tuple[int, int]:
    """Validate [..., G, K] / [..., H, V] / [..., H] / [..., H, L] shapes; returns (H // G, L)."""
    G, K = q.shape[-2:]
    H = v.shape[-2]
    lead = q.shape[:-2]
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:-2] != lead or g.shape != (*lead, H) or level_scales.shape[:-1] != (*lead, H):
        raise ValueError(
            f"inconsistent shapes: q {tuple(q.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, "
            f"level_scales {tuple(level_scales.shape)}"
        )
    if H % G != 0:
        raise ValueError(f"value heads ({H}) must be a multiple of q/k groups ({G})")
    return H // G, level_scales.shape[-1]


def check_final_into(pool: torch.Tensor, slots: torch.Tensor, n: int, level_shape: tuple[int, ...],
                     device: torch.device) -> int:
    """Validate a prefill's ``final_into=(pool, slots)``: pool [P, L', H, K, V] contiguous on ``device``
    for level_shape (L, H, K, V), holding the top L' <= L levels (a windowed pool keeps levels 0..BW as
    tokens, kernels/window.py); slots [n] int64 on it (distinct rows: not checked, that would
    synchronise). Returns L - L', the first level the pool holds."""
    L, *rest = level_shape
    if (pool.dim() != len(level_shape) + 1 or not 1 <= pool.shape[1] <= L or list(pool.shape[2:]) != rest
            or not pool.is_contiguous() or pool.device != device):
        raise ValueError(f"final_into pool must be a contiguous [P, <= {L}, {', '.join(map(str, rest))}] "
                         f"tensor on {device}, got {tuple(pool.shape)} on {pool.device}")
    if slots.shape != (n,) or slots.dtype != torch.int64 or slots.device != device:
        raise ValueError(f"final_into slots must be [{n}] int64 on {device}, got {tuple(slots.shape)} "
                         f"{slots.dtype} on {slots.device}")
    return L - pool.shape[1]


def check_level_decay(level_decay: torch.Tensor, levels: torch.Tensor) -> None:
    """Validate a decode pool's ``level_decay``: [P, 2, L, H] float32 (float64 in checks), contiguous,
    beside ``levels`` [P, L, H, K, V]."""
    P, L, H = levels.shape[:3]
    if (level_decay.shape != (P, 2, L, H) or level_decay.dtype not in (torch.float32, torch.float64)
            or not level_decay.is_contiguous() or level_decay.device != levels.device):
        raise ValueError(f"level_decay must be a contiguous float32 [{P}, 2, {L}, {H}] tensor on "
                         f"{levels.device}, got {tuple(level_decay.shape)} {level_decay.dtype} "
                         f"on {level_decay.device}")


def check_pool_levels(levels: torch.Tensor, num_levels: int, window: tuple | None) -> int:
    """The first level a pool stores as blocks: BW + 1 with a token window (levels 0..BW are its tokens;
    the pool is [P, num_levels - BW - 1, H, K, V]), else 0 (all num_levels)."""
    low = BW + 1 if window is not None else 0
    if levels.dim() != 5 or levels.shape[1] != num_levels - low:
        raise ValueError(f"a pool of {num_levels} levels{' with a token window' if low else ''} stores "
                         f"{num_levels - low} level blocks per slot, got levels {tuple(levels.shape)}")
    return low


def check_initial_state(state: FenwickState | PooledState | None, n: int,
                        level_shape: tuple[int, ...]) -> None:
    """A prefill's initial state must hold the call's N sequences with levels of ``level_shape``."""
    if state is None:
        return
    if isinstance(state, PooledState):  # the pool's decay has every level; a window's pool stores the top
        rows, shape = state.num_seqs, (state.decay.shape[2], *state.levels.shape[2:])
        check_pool_levels(state.levels, state.decay.shape[2], state.window)
    else:
        rows, shape = state.levels.shape[0], tuple(state.levels.shape[1:])
    if rows != n or tuple(shape) != tuple(level_shape):
        raise ValueError(f"initial_state must hold {n} sequences of levels {tuple(level_shape)}, got "
                         f"{rows} of {tuple(shape)}")


def num_levels_for(length: int) -> int:
    """Levels needed by positions 0..length-1: bitlen(length - 1) + 1."""
    return max(int(length - 1).bit_length(), 0) + 1


def max_positions(num_levels: int) -> int:
    """Longest sequence that ``num_levels`` levels can hold: 2^(L-1)."""
    return 1 << (num_levels - 1)


def bitlen(x: torch.Tensor) -> torch.Tensor:
    """Bit length of each non-negative int64 (0 -> 0), in exact integer arithmetic on any device."""
    out = torch.zeros_like(x)
    y = x.clone()
    for _ in range(63):
        nz = y > 0
        if not bool(nz.any()):
            break
        out += nz.to(out.dtype)
        y = y >> 1
    return out


def level_matrix(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """level(t, s) for broadcastable int64 position tensors: 0 on the diagonal, bitlen(t ^ s) else.

    Only meaningful for s <= t.
    """
    return bitlen(torch.bitwise_xor(t, s))


def ctz(t: torch.Tensor) -> torch.Tensor:
    """Index of the lowest set bit of each positive int64 in t (-1 where t == 0)."""
    return bitlen(torch.bitwise_and(t, -t)) - 1


def true_levels(levels: torch.Tensor, level_decay: torch.Tensor, slots: torch.Tensor,
                positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The levels S[l] of ``slots`` at ``positions`` from a pool with deferred decay:
    S[l] = levels[slot, l] * exp(level_decay[slot, position % 2, l]) per head, zero where the log-decay
    is -inf (an empty level, whatever its block holds). -> [N, L, H, K, V] in ``dtype``."""
    slots, positions = slots.long(), positions.to(slots.device).long()
    a = level_decay[slots, positions % 2].to(dtype)  # (N, L, H)
    w = torch.where(torch.isneginf(a), 0.0, a.exp())
    stored = levels[slots].to(dtype)
    return torch.where(w[..., None, None] > 0, stored * w[..., None, None], 0.0)


def step_level_blocks(t: int, deferred: bool = True) -> tuple[int, int]:
    """(blocks read, blocks written) per head by the decode step at position t (one block = one level's
    K x V): it reads levels 0..z (z = ctz(t), folded) and the live levels above z + 1, and writes level 0
    and level z + 1; in place (deferred=False) it also rewrites the live levels above and zeroes 1..z."""
    if t == 0:
        return 0, 1
    z = (t & -t).bit_length() - 1
    above = bin(t).count("1") - 1  # live levels above z + 1
    reads = z + 1 + above
    return reads, 2 if deferred else 2 + above + z


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


@dataclass
class WindowRows:
    """Where a prefill's packed rows land in the token windows: the rows of each sequence's last block
    (rows first .. first + count - 1 of that block's buffer), per sequence."""

    first: torch.Tensor  # [N] first row written (> 0: the block began before this call)
    slot: torch.Tensor  # [N]
    buf: torch.Tensor  # [N] block parity
    count: torch.Tensor  # [N] rows written
    src: torch.Tensor  # [N] packed row of the first of them


def window_rows(starts: list[int], lens: list[int], slots: torch.Tensor) -> WindowRows:
    """The plan of ``write_window`` for sequences continuing from ``starts`` (host values) by ``lens``
    tokens into ``slots`` (a device tensor): one upload, no read-back."""
    arrays = window_plan_arrays(starts, lens)
    t = torch.tensor(np.stack(arrays), dtype=torch.int64)
    t = t.pin_memory().to(slots.device, non_blocking=True) if slots.is_cuda else t.to(slots.device)
    return WindowPlan(tuple(t.unbind(0))).bind(slots)


@dataclass(frozen=True)
class WindowPlan:
    """``WindowRows`` before the slots are known, on the device. ``bind`` adds the slots without a
    device op, so a CUDA graph can capture it over a static slots buffer."""

    rows: tuple[torch.Tensor, ...]  # first, buf, count, src [N]

    def bind(self, slots: torch.Tensor) -> WindowRows:
        first, buf, count, src = self.rows
        return WindowRows(first, slots, buf, count, src)


def window_plan_arrays(starts: list[int], lens: list[int]) -> list[np.ndarray]:
    """``WindowPlan``'s rows on the host: int64 first, buf, count, src [N] (a sequence with no new token
    writes no row)."""
    starts_np, lens_np = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
    end = starts_np + lens_np
    block = np.maximum(end - 1, 0) >> BW
    lo = np.maximum(starts_np, block << BW)
    bos = np.concatenate([[0], np.cumsum(lens_np)[:-1]]).astype(np.int64)
    first = np.where(lens_np > 0, lo - (block << BW), 0)
    count = np.where(lens_np > 0, end - lo, 0)
    return [first, block % 2, count, bos + np.where(lens_np > 0, lo - starts_np, 0)]
