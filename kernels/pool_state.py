"""A prefill's initial state read straight from the engine's state pool (PyTorch reference).

The engine stores each slot's Fenwick levels with their decay deferred (``level_decay``) and, with a
token window, the low levels as raw tokens (kernels/window.py). A prefill that continues sequences needs
their levels S as the first query sees them, merged (``merge_for_query``) and summed over levels: the
chunk kernel's ``m_lv`` and ``cm_lv``. Built op by op that is ~30 small launches per layer and, with a
window, einsum path searches on the host: the prompt step of a batch with one continuing chunk took
40-125 ms of host time on the H200 (tools/profile_decode.py). ``kernels.pool_triton`` does it in one
launch per layer; ``merged_levels_ref`` here is its specification and the CPU path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .state import FenwickState, true_levels
from .window import check_pool_levels, windowed_levels


@dataclass
class PooledState:
    """The state of N sequences where the engine keeps it.

    levels: [P, L, H, K, V] pool (any float dtype), stored with the decay deferred; with a window only
        levels BW+1..L-1 are blocks ([P, L - BW - 1, H, K, V], kernels.window.check_pool_levels);
    decay: [P, 2, L, H] float32, the log-decay each stored level owes (-inf: empty);
    slots, positions: [N] int64 on the pool's device; window: (win_k, win_v, win_g) of the pool, or None.
    """

    levels: torch.Tensor
    decay: torch.Tensor
    slots: torch.Tensor
    positions: torch.Tensor
    window: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def fenwick(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The levels S of the N sequences at their positions: [N, L, H, K, V] in ``dtype``."""
        if self.window is not None:
            return windowed_levels(self.levels, self.decay, self.window, self.slots, self.positions, dtype)
        return true_levels(self.levels, self.decay, self.slots, self.positions, dtype)

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]


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
    merged = merge_for_query(state.fenwick(), state.positions)
    return merged, merged.cumsum(1)


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


def initial_levels(state: FenwickState | PooledState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The levels S [N, L, H, K, V] of an initial state (a pooled one converted, in float32 by default)."""
    if isinstance(state, PooledState):
        return state.fenwick(dtype or torch.float32)
    return state.levels if dtype is None else state.levels.to(dtype)
