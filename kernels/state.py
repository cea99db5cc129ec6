"""The per-sequence Fenwick-tree hidden state and level arithmetic shared by every op."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def check_level_decay(level_decay: torch.Tensor, levels: torch.Tensor) -> None:
    """Validate a decode pool's ``level_decay``: [P, 2, L, H] float32 (float64 in checks), contiguous,
    beside ``levels`` [P, L, H, K, V]."""
    P, L, H = levels.shape[:3]
    if (level_decay.shape != (P, 2, L, H) or level_decay.dtype not in (torch.float32, torch.float64)
            or not level_decay.is_contiguous() or level_decay.device != levels.device):
        raise ValueError(f"level_decay must be a contiguous float32 [{P}, 2, {L}, {H}] tensor on "
                         f"{levels.device}, got {tuple(level_decay.shape)} {level_decay.dtype} "
                         f"on {level_decay.device}")


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
