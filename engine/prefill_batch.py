"""A prompt step's inputs on the device: the packed token ids, the sequences' slots, boundaries and start
positions, and the kernels' plans (the Triton prefill's chunk plan, the token windows' rows), built on
the host in O(chunks) and moved in one copy.

Padded to a ``PrefillShape`` (engine/prefill_graphs.py), a step keeps the token and sequence counts
and the plans' capacities of its bucket whatever its own lengths and positions: the step's sequences
come first, then one sequence of padding tokens and empty ones, all in the pool's dummy slot (nobody
reads it). Every kernel then reads the step from device memory and launches the same grids, so one
CUDA graph serves every step of the bucket.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.chunk_plan import ChunkCapacity, ChunkPlan, chunk_capacity, plan_arrays
from ..kernels.state import WindowPlan, max_positions, window_plan_arrays


@dataclass(frozen=True)
class PrefillShape:
    """What a prompt step's launches depend on: its padded token and sequence counts (the padding
    sequence included), and whether any sequence continues from a stored state."""

    num_tokens: int
    num_seqs: int
    continuing: bool


@dataclass(frozen=True)
class PrefillLayout:
    """Where a step's parts lie in its flat int64 buffer (each on a 16-byte boundary)."""

    num_tokens: int
    num_seqs: int
    num_real: int  # the step's own sequences; the rest are padding
    continuing: bool
    window: bool  # the pool has token windows: their rows are planned
    chunk: ChunkCapacity | None  # the Triton prefill's plan capacity, or None (the PyTorch path)

    @property
    def sizes(self) -> list[int]:
        n = self.num_seqs
        sizes = [self.num_tokens, n, n + 1, n, n]  # ids, slots, cu, lens, starts
        sizes += [n] * 4 if self.window else []
        return sizes + (self.chunk.part_sizes(n) if self.chunk is not None else [])

    @property
    def offsets(self) -> list[int]:
        """Each part's offset, then the total: parts padded to an even count of int64 (16 bytes)."""
        at = [0]
        for n in self.sizes:
            at.append(at[-1] + n + n % 2)
        return at


@dataclass(frozen=True)
class PrefillBatch:
    """A prompt step on the device (views of one buffer)."""

    layout: PrefillLayout
    ids: torch.Tensor  # [T] packed token ids
    slots: torch.Tensor  # [N]
    cu: torch.Tensor  # [N + 1] cumulative lengths
    lens: torch.Tensor  # [N]
    starts: torch.Tensor  # [N] positions the sequences continue from
    window: WindowPlan | None  # where the tokens land in the token windows
    chunk: ChunkPlan | None  # the Triton prefill's plan
    host_bounds: list[int]  # cu_seqlens as the host knows them
    host_starts: list[int]

    @classmethod
    def bind(cls, buffer: torch.Tensor, layout: PrefillLayout, host_bounds: list[int],
             host_starts: list[int]) -> PrefillBatch:
        at = layout.offsets
        parts = [buffer[a:a + n] for a, n in zip(at, layout.sizes, strict=False)]
        ids, slots, cu, lens, starts, *rest = parts
        window = WindowPlan(tuple(rest[:4])) if layout.window else None
        chunk = None
        if layout.chunk is not None:
            chunk = ChunkPlan.bind(rest[4 if layout.window else 0:], layout.chunk)
        return cls(layout, ids, slots, cu, lens, starts, window, chunk, host_bounds, host_starts)

    @property
    def continuing(self) -> bool:
        """Some sequence starts from a stored state (the prefill reads the pool)."""
        return self.layout.continuing


def fits(pad: PrefillShape, num_tokens: int, num_seqs: int, continuing: bool, num_levels: int) -> bool:
    """Whether a step fits a bucket: at most its tokens, fewer sequences (one is padding), fresh only in
    a fresh bucket, and padding sequences enough to hold the spare tokens within the levels."""
    spare, extra = pad.num_tokens - num_tokens, pad.num_seqs - num_seqs
    return (spare >= 0 and extra >= 1 and (pad.continuing or not continuing)
            and spare <= extra * max_positions(num_levels))


def prefill_arrays(token_ids: Sequence[int], slots: Sequence[int], starts: Sequence[int],
                   lens: Sequence[int], *, num_levels: int, window: bool, chunk_plan: bool,
                   pad: PrefillShape | None = None, pad_slot: int = 0
                   ) -> tuple[list[np.ndarray], PrefillLayout]:
    """The parts of a step (``PrefillLayout.sizes``) as host arrays, padded to ``pad`` if given: the
    spare tokens in padding sequences from position 0 (as few as the levels allow), then empty ones,
    all in ``pad_slot``."""
    n_real, t_real = len(lens), len(token_ids)
    ids, slots, starts, lens = list(token_ids), list(slots), list(starts), list(lens)
    continuing = any(starts)
    capacity = None
    if pad is not None:
        if not fits(pad, t_real, n_real, continuing, num_levels):
            raise ValueError(f"a step of {t_real} tokens in {n_real} sequences does not fit {pad}")
        extra, spare = pad.num_seqs - n_real, pad.num_tokens - t_real
        most = max_positions(num_levels)  # a padding sequence is one from position 0
        ids += [0] * spare
        slots += [pad_slot] * extra
        starts += [0] * extra
        lens += [min(most, max(spare - i * most, 0)) for i in range(extra)]
        continuing = pad.continuing
        if chunk_plan:
            capacity = chunk_capacity(pad.num_tokens, pad.num_seqs, num_levels)
    bounds = [0, *np.cumsum(lens).tolist()]
    parts = [np.asarray(ids), np.asarray(slots), np.asarray(bounds), np.asarray(lens), np.asarray(starts)]
    if window:
        parts += window_plan_arrays(starts, lens)
    if chunk_plan:
        chunk_parts, capacity = plan_arrays(starts, lens, num_levels, capacity=capacity)
        parts += chunk_parts
    layout = PrefillLayout(len(ids), len(lens), n_real, continuing, window, capacity)
    return parts, layout


def fill(buffer: np.ndarray, parts: Sequence[np.ndarray], layout: PrefillLayout) -> None:
    """Write the parts into a flat host buffer at the layout's offsets."""
    for part, at, n in zip(parts, layout.offsets, layout.sizes, strict=False):
        buffer[at:at + n] = part


def upload(parts: Sequence[np.ndarray], layout: PrefillLayout, device: torch.device) -> torch.Tensor:
    """The parts in a new device buffer: one copy (pinned and queued on CUDA, no wait)."""
    flat = np.zeros(layout.offsets[-1], np.int64)
    fill(flat, parts, layout)
    buf = torch.from_numpy(flat)
    return buf.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else buf.to(device)
