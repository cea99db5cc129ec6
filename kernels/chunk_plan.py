"""The host plan of the Triton prefill (``chunk.py``): which chunk belongs to which sequence, where each
sequence's Fenwick nodes start, which nodes fold their children. Numpy on the host, O(chunks).

A plan can be built to fixed capacities (``chunk_capacity``): every array then has the same length
for any lengths and start positions that fit, and the kernels' grids depend on the capacities alone,
so that a CUDA graph captured for one prompt step replays for another of the same token and sequence
counts (engine/prefill_graphs.py). Chunks past the step's own are marked by ``num_chunks`` (their
programs return at once); fold slots past a size's own nodes hold -1.

A leaf beside ``state.py``: numpy and torch only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .state import max_positions

CHUNK_SIZE = 64  # BT: levels <= log2(BT) are intra-chunk
DIRECT_LEVELS = 3  # Z0: nodes of up to 2^Z0 chunks are summed straight from k and v


@dataclass(frozen=True)
class ChunkCapacity:
    """Array lengths of a plan: chunks, and fold slots per node size z (nodes of 2^z chunks)."""

    chunks: int
    folds: tuple[tuple[int, int], ...]  # (z, slots)

    def part_sizes(self, num_seqs: int) -> list[int]:
        """Lengths of ``plan_arrays``' parts, in order, for ``num_seqs`` sequences."""
        return [1, self.chunks, *[num_seqs] * 5, *[n for _, n in self.folds]]


def chunk_capacity(num_tokens: int, num_seqs: int, num_levels: int, chunk_size: int = CHUNK_SIZE,
                   direct_levels: int = DIRECT_LEVELS) -> ChunkCapacity:
    """Capacities that hold any step of at most ``num_tokens`` tokens in ``num_seqs`` sequences from
    any start positions: a sequence spans at most len / BT + 2 chunks (unaligned at both ends), and
    holds at most its chunks / 2^z + 1 nodes of size 2^z."""
    chunks = -(-num_tokens // chunk_size) + 2 * num_seqs
    top = max(((max_positions(num_levels) - 1) // chunk_size).bit_length(), 1)
    folds = tuple((z, min(chunks, (chunks >> z) + num_seqs)) for z in range(direct_levels + 1, top + 1))
    return ChunkCapacity(chunks, folds)


def plan_arrays(starts: Sequence[int], lens: Sequence[int], num_levels: int, chunk_size: int = CHUNK_SIZE,
                direct_levels: int = DIRECT_LEVELS, capacity: ChunkCapacity | None = None
                ) -> tuple[list[np.ndarray], ChunkCapacity]:
    """The plan of sequences continuing from ``starts`` by ``lens`` tokens (packed in this order):
    int64 arrays [num_chunks (1), chunk_seq (chunks), seq_bos, seq_start, seq_len, seq_node0, ends (N
    each), fold slots (one array per z of the capacity)], and the capacity used (the exact one where
    none is given)."""
    BT = chunk_size
    N = len(lens)
    starts_np, lens_np = np.asarray(starts, np.int64), np.asarray(lens, np.int64)
    ends = starts_np + lens_np
    if N and int(ends.max()) > max_positions(num_levels):
        raise ValueError(f"sequence reaches {int(ends.max())} tokens but {num_levels} levels hold at most "
                         f"{max_positions(num_levels)}")
    cf = starts_np // BT
    ce = (ends - 1) // BT
    nchunks = np.where(lens_np > 0, ce - cf + 1, 0)
    node0 = np.concatenate([[0], np.cumsum(nchunks)[:-1]]).astype(np.int64)
    bos = np.concatenate([[0], np.cumsum(lens_np)[:-1]]).astype(np.int64)
    NC = int(nchunks.sum())
    chunk_seq = np.repeat(np.arange(N, dtype=np.int64), nchunks)
    c_abs = cf[chunk_seq] + np.arange(NC, dtype=np.int64) - node0[chunk_seq]
    nxt = c_abs + 1
    zc = np.log2(nxt & -nxt).astype(np.int64)
    fold = (c_abs < ce[chunk_seq]) & (zc > direct_levels)
    if capacity is None:
        capacity = ChunkCapacity(NC, tuple((int(z), int(((zc == z) & fold).sum()))
                                           for z in sorted(set(zc[fold].tolist()))))
    if NC > capacity.chunks:
        raise ValueError(f"{NC} chunks exceed the plan's capacity of {capacity.chunks}")
    chunk_rows = np.zeros(capacity.chunks, np.int64)
    chunk_rows[:NC] = chunk_seq
    parts = [np.asarray([NC], np.int64), chunk_rows, bos, starts_np, lens_np, node0, ends]
    folded = 0
    for z, slots in capacity.folds:
        idx = np.nonzero(fold & (zc == z))[0]
        if len(idx) > slots:
            raise ValueError(f"{len(idx)} nodes of size 2^{z} exceed the plan's {slots} slots")
        parts.append(np.concatenate([idx, np.full(slots - len(idx), -1, np.int64)]))
        folded += len(idx)
    if folded != int(fold.sum()):
        raise ValueError("the plan's capacity lacks a node size that this step folds")
    return parts, capacity


@dataclass(frozen=True)
class ChunkPlan:
    """A plan on the device (views of ``plan_arrays``' parts), read by the Triton prefill's kernels."""

    num_seqs: int
    capacity: ChunkCapacity
    num_chunks: torch.Tensor  # [1] chunks in use (the rest of the grid returns at once)
    chunk_seq: torch.Tensor  # [chunks] sequence of each chunk
    seq_rows: tuple[torch.Tensor, ...]  # bos, start, len, node0 [N]
    ends: torch.Tensor  # [N] positions after the call
    folds: tuple[tuple[int, torch.Tensor], ...]  # (z, node indices [slots], -1 unused)
    chunk_size: int = CHUNK_SIZE
    direct_levels: int = DIRECT_LEVELS

    @classmethod
    def bind(cls, parts: Sequence[torch.Tensor], capacity: ChunkCapacity, chunk_size: int = CHUNK_SIZE,
             direct_levels: int = DIRECT_LEVELS) -> ChunkPlan:
        """The plan over device tensors holding ``plan_arrays``' parts, in its order."""
        num_chunks, chunk_seq, bos, start, length, node0, ends, *folds = parts
        if len(folds) != len(capacity.folds):
            raise ValueError(f"{len(folds)} fold arrays for {len(capacity.folds)} node sizes")
        return cls(bos.numel(), capacity, num_chunks, chunk_seq, (bos, start, length, node0), ends,
                   tuple((z, t) for (z, _), t in zip(capacity.folds, folds, strict=True)),
                   chunk_size, direct_levels)


def upload(arrays: Sequence[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """int64 host arrays -> device tensors through one buffer: pinned and copied without a wait on
    CUDA (the host runs on while the copy is queued). Each array starts on a 16-byte boundary: Triton
    specialises pointer arguments on that alignment, so views at odd offsets would compile new kernels
    for batches of other sizes in the middle of serving."""
    sizes = [int(np.size(a)) for a in arrays]
    padded = [n + n % 2 for n in sizes]
    flat = np.zeros(sum(padded), np.int64)
    for a, at in zip(arrays, np.cumsum([0, *padded[:-1]]), strict=True):
        flat[at:at + np.size(a)] = np.asarray(a, np.int64).ravel()
    buf = torch.from_numpy(flat)
    buf = buf.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else buf.to(device)
    return [t[:n] for t, n in zip(torch.split(buf, padded), sizes, strict=True)]


def build_plan(starts: Sequence[int], lens: Sequence[int], num_levels: int, device: torch.device,
               chunk_size: int = CHUNK_SIZE, direct_levels: int = DIRECT_LEVELS,
               capacity: ChunkCapacity | None = None) -> ChunkPlan:
    """``plan_arrays`` uploaded (one copy) and bound."""
    parts, capacity = plan_arrays(starts, lens, num_levels, chunk_size, direct_levels, capacity)
    return ChunkPlan.bind(upload(parts, device), capacity, chunk_size, direct_levels)
