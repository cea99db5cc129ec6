"""The per-request state pool: one ModelState allocated once at start-up, and a slot allocator over it.

Slot count = min(max_num_seqs, what fits in the memory budget). On CUDA the budget is a fraction of
the memory free after the model is loaded, minus headroom for prefill activations; on the CPU a
fraction of the available RAM. One extra slot past the allocator's range is reserved as the dummy
that CUDA-graph padding rows write into; no request ever holds it.

The prefix cache's device rows (engine/state_snapshot.py) take only what the budget has left once the
slots are sized, so the cache never costs a running request its slot; its host rows are extra. Each tier
holds at most SNAPSHOTS_PER_SLOT rows per slot, so that small states do not turn a byte budget into a
pointless number of rows.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .model_state import ModelState
from .state_snapshot import SnapshotBank

logger = logging.getLogger(__name__)

GiB = 1 << 30
SNAPSHOTS_PER_SLOT = 16  # most snapshot rows per tier and state slot


class SlotAllocator:
    """Free list over slots 0..num_slots-1 (lowest first). Pure Python, shared with the scheduler."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError("a state pool needs at least one slot")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: pop() gives the lowest free slot
        self._used: set[int] = set()

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free state slot")
        slot = self._free.pop()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise RuntimeError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)


def state_bytes_per_slot(model_config: Any, dtype: torch.dtype, state_dtype: torch.dtype,
                         num_levels: int | None = None, token_window: bool = True) -> int:
    """Bytes one slot of ModelState takes, measured on the meta device (no memory touched)."""
    kw = dict(state_dtype=state_dtype, num_levels=num_levels, token_window=token_window)
    try:
        probe = ModelState.allocate(model_config, 1, torch.device("meta"), dtype, **kw)
    except (NotImplementedError, RuntimeError):
        probe = ModelState.allocate(model_config, 1, torch.device("cpu"), dtype, **kw)
    return int(probe.bytes_per_slot)


def prefill_headroom_bytes(model_config: Any, max_num_seqs: int, max_num_batched_tokens: int) -> int:
    """Transient bytes a worst-case step needs beside the pool: activations of the step's tokens, and the
    prefill path's per-layer fp32 copies of its sequences' levels (gathered, final and written back)."""
    c = model_config
    activations = 64 * max_num_batched_tokens * c.hidden_size * c.expand * 4
    prefill_seqs = min(max_num_seqs, max(max_num_batched_tokens // 2, 1))  # prompt chunks have >= 2 tokens
    levels_fp32 = c.lambda_levels * c.num_heads * c.state_size * c.head_dim * 4  # one layer, one sequence
    return activations + 3 * prefill_seqs * levels_fp32


def memory_budget(device: torch.device, memory_fraction: float, headroom_bytes: int) -> int:
    """Bytes the pool may take: a fraction of free device memory (CUDA) or available RAM (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(int(free * memory_fraction) - headroom_bytes, 0)
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        available = 8 * GiB
    return int(available * memory_fraction)


class StatePool:
    """Owns the ModelState of every running request (slots) plus the CUDA-graph dummy slot."""

    def __init__(self, model_config: Any, *, max_num_seqs: int, device: torch.device, dtype: torch.dtype,
                 state_dtype: torch.dtype, memory_fraction: float, headroom_bytes: int = 0,
                 max_model_len: int | None = None, snapshot_bytes: int = 0,
                 snapshot_host_bytes: int = 0) -> None:
        """max_model_len: the longest sequence the engine admits; slots then hold only the Fenwick levels
        such sequences reach (num_levels_for(max_model_len), at most the model's lambda_levels).
        snapshot_bytes, snapshot_host_bytes: at most so much device / host memory for prefix-cache rows."""
        levels = None if max_model_len is None else ModelState.levels_for(model_config, max_model_len)
        self.bytes_per_slot = state_bytes_per_slot(model_config, dtype, state_dtype, levels)
        budget = memory_budget(device, memory_fraction, headroom_bytes)
        fit = budget // self.bytes_per_slot - 1  # minus the dummy slot
        if fit < 1:
            raise RuntimeError(
                f"not enough memory for one state slot: {self.bytes_per_slot / 2**20:.1f} MiB per slot, "
                f"budget {budget / 2**20:.1f} MiB on {device}")
        num_slots = int(min(max_num_seqs, fit))
        if num_slots < max_num_seqs:
            logger.warning("state pool: memory fits %d slots, fewer than max_num_seqs=%d", num_slots,
                           max_num_seqs)
        self.state = ModelState.allocate(model_config, num_slots + 1, device, dtype, state_dtype=state_dtype,
                                         num_levels=levels)
        self.allocator = SlotAllocator(num_slots)
        self.dummy_slot = num_slots  # CUDA-graph padding rows write here
        self.state.reset(torch.arange(num_slots + 1, device=device))
        logger.info("state pool: %d slots (+1 dummy) x %.2f MiB per request (%d levels, %s) = %.1f MiB on %s",
                    num_slots, self.bytes_per_slot / 2**20, self.state.num_levels, state_dtype,
                    self.nbytes / 2**20, device)
        most = SNAPSHOTS_PER_SLOT * num_slots
        device_rows = int(min(snapshot_bytes // self.bytes_per_slot, fit - num_slots, most))
        host_rows = int(min(snapshot_host_bytes // self.bytes_per_slot, most))
        self.snapshots: SnapshotBank | None = None
        if device_rows or host_rows:
            self.snapshots = SnapshotBank(self.state, model_config, device_rows, host_rows)
            logger.info("prefix cache: %d snapshots on %s + %d in host memory, %.2f MiB each", device_rows,
                        device, host_rows, self.bytes_per_slot / 2**20)
        elif snapshot_bytes or snapshot_host_bytes:
            logger.warning("prefix cache: no memory left for one snapshot (%.2f MiB) beside the slots",
                           self.bytes_per_slot / 2**20)

    @property
    def num_slots(self) -> int:
        return self.allocator.num_slots

    @property
    def nbytes(self) -> int:
        return int(self.state.nbytes)
