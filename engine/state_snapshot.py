"""Snapshot rows of the prefix cache: whole slot states in device memory and in pinned host memory.

A row holds what ``ModelState.copy_`` copies: per layer the level blocks, both decay buffers, the conv
state and both token-window buffers, and the position -- everything a later prefill or decode step of the
slot reads -- so a restored slot continues bit for bit as the saved one would have (a copy changes no value).

Device rows are a ModelState of their own (rows shaped like slots): a save or restore is one index copy
per tensor kind on the device, queued without a host synchronisation. Host rows are [rows, layers, ...]
per kind, one contiguous block per row, so that device and host exchange rows with non-blocking copies.
Demotions (device row -> host row) run on a side stream so that eviction traffic overlaps the model; the
main stream waits for that copy (an event, not the host) before it overwrites the device row or reads the
host row. Allocated once, at start-up, by the state pool.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch

from .model_config import ModelConfig
from .model_state import ModelState, device_ints
from .prefix_cache import StateCopy, Tier

logger = logging.getLogger(__name__)


def state_stacks(state: ModelState) -> tuple[torch.Tensor, ...]:
    """The [layers, P, ...] tensors of a ModelState (levels, conv, decay, window), positions aside."""
    return (state.all_levels, state.all_conv, state.all_decay, *(state.all_window or ()))


class SnapshotBank:
    def __init__(self, pool: ModelState, model_config: ModelConfig, device_rows: int, host_rows: int) -> None:
        """Rows for snapshots of ``pool``'s slots: ``device_rows`` beside it, ``host_rows`` in host memory
        (pinned where the pool is on CUDA)."""
        self.device = pool.device
        self.device_rows, self.host_rows = device_rows, host_rows
        self.rows: ModelState | None = None
        if device_rows:
            self.rows = ModelState.allocate(
                model_config, device_rows, self.device, pool.all_conv.dtype,
                state_dtype=pool.all_levels.dtype, num_levels=pool.num_levels,
                token_window=pool.all_window is not None)
        cuda = self.device.type == "cuda"
        self.host: list[torch.Tensor] = [  # per kind [host_rows, layers, ...], positions last
            torch.zeros((host_rows, *t[:, 0].shape), dtype=t.dtype, pin_memory=cuda)
            for t in state_stacks(pool)] if host_rows else []
        if host_rows:
            self.host.append(torch.zeros(host_rows, dtype=torch.int64, pin_memory=cuda))
        self.side = torch.cuda.Stream(self.device) if cuda and host_rows else None
        self._device_busy: dict[int, torch.cuda.Event] = {}  # device row -> its demotion's copy
        self._host_busy: dict[int, torch.cuda.Event] = {}  # host row -> the copy writing it

    @property
    def nbytes(self) -> int:
        device = 0 if self.rows is None else self.rows.nbytes
        return device + sum(t.numel() * t.element_size() for t in self.host)

    def copy(self, pool: ModelState, copies: Sequence[StateCopy]) -> None:
        """Run ``copies`` in order (runs of one kind batched)."""
        for (src, dst), run in itertools.groupby(copies, key=lambda c: (c.src, c.dst)):
            group = list(run)
            if Tier.HOST not in (src, dst):
                self._on_device(pool, group)
            elif src is Tier.DEVICE:
                self._demote(group)
            elif src is Tier.SLOT:
                for c in group:
                    self._wait(self._host_busy.pop(c.dst_index, None))
                    self._to_host(pool, c.src_index, c.dst_index)
            elif dst is Tier.SLOT:
                for c in group:
                    self._wait(self._host_busy.pop(c.src_index, None))
                    self._from_host(c.src_index, pool, c.dst_index)
            else:
                raise ValueError(f"unsupported snapshot copy {group[0]}")

    def _on_device(self, pool: ModelState, group: list[StateCopy]) -> None:
        """Slot <-> device row copies: one gather and one scatter per tensor kind."""
        assert self.rows is not None
        src = pool if group[0].src is Tier.SLOT else self.rows
        dst = pool if group[0].dst is Tier.SLOT else self.rows
        if dst is self.rows:
            for c in group:
                self._wait(self._device_busy.pop(c.dst_index, None))
        src_idx, dst_idx = device_ints([c.src_index for c in group] + [c.dst_index for c in group],
                                       self.device).split(len(group))
        pairs = zip((*state_stacks(src), src.positions), (*state_stacks(dst), dst.positions), strict=True)
        for s, d in pairs:
            dim = 1 if d.dim() > 1 else 0
            d.index_copy_(dim, dst_idx, s.index_select(dim, src_idx))

    def _demote(self, group: list[StateCopy]) -> None:
        """Device rows -> host rows, on the side stream after everything queued so far."""
        assert self.rows is not None
        if self.side is None:
            for c in group:
                self._to_host(self.rows, c.src_index, c.dst_index)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            for c in group:
                self._to_host(self.rows, c.src_index, c.dst_index)
            done = torch.cuda.Event()
            done.record(self.side)
        for c in group:
            self._device_busy[c.src_index] = self._host_busy[c.dst_index] = done

    def _to_host(self, state: ModelState, index: int, row: int) -> None:
        for h, t in zip(self.host, (*state_stacks(state), state.positions), strict=True):
            src = t[:, index] if t.dim() > 1 else t[index:index + 1]
            (h[row] if t.dim() > 1 else h[row:row + 1]).copy_(src, non_blocking=True)

    def _from_host(self, row: int, state: ModelState, index: int) -> None:
        for h, t in zip(self.host, (*state_stacks(state), state.positions), strict=True):
            dst = t[:, index] if t.dim() > 1 else t[index:index + 1]
            dst.copy_(h[row] if t.dim() > 1 else h[row:row + 1], non_blocking=True)

    def _wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
