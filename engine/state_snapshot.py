"""Snapshot rows of the prefix cache: slot states in device memory and in pinned host memory.

A row holds a slot's state: per layer the level blocks, both decay buffers, the conv state and both
token-window buffers, and the position -- everything a later prefill or decode step of the slot reads.
Of the level blocks only the live ones move: after t tokens, level l >= 1 holds tokens only where bit
l - 1 of t - 1 is set (level 0: t >= 1), so a save copies popcount(t - 1) blocks or fewer, not every level,
and a restore writes the others as zeros (an empty level, whatever its decay says). A restored slot so holds
the saved state's values and continues bit for bit as the saved slot would have (tests).

Device rows are a ModelState of their own (rows shaped like slots): saves and restores are copies on the
device, queued without a host synchronisation. Host rows are one contiguous block per row and kind (levels
[rows, level, layers, ...], so that each run of live levels is one block too), exchanged with the device
by non-blocking copies. Demotions (device row -> host row) run on a side stream so that eviction traffic
overlaps the model; the main stream waits for that copy (an event, not the host) before it overwrites the
device row or reads the host row. Allocated once, at start-up, by the state pool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from .model_config import ModelConfig
from .model_state import ModelState
from .prefix_cache import StateCopy, Tier

logger = logging.getLogger(__name__)


def state_stacks(state: ModelState) -> tuple[torch.Tensor, ...]:
    """The [layers, P, ...] tensors of a ModelState (levels, conv, decay, window), positions aside."""
    return (state.all_levels, state.all_conv, state.all_decay, *(state.all_window or ()))


def slot_view(t: torch.Tensor, index: int) -> torch.Tensor:
    """Slot ``index`` of a [layers, P, ...] stack, or of the positions [P] (as [1])."""
    return t[:, index] if t.dim() > 1 else t[index:index + 1]


def live_level_runs(position: int, num_levels: int, low: int) -> list[tuple[int, int]]:
    """[start, stop) runs of the stored levels (index l - low for level l >= low) that hold tokens after
    ``position`` tokens; every stored level where the position is unknown (< 0)."""
    if position <= 0:
        return [(0, num_levels - low)] if position < 0 else []
    live = [lv - low for lv in range(low, num_levels)
            if (position >= 1 if lv == 0 else (position - 1) >> (lv - 1) & 1)]
    runs: list[tuple[int, int]] = []
    for i in live:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def dead_runs(live: list[tuple[int, int]], stored: int) -> list[tuple[int, int]]:
    """The runs of stored levels between the live ones."""
    out, at = [], 0
    for a, b in live:
        if a > at:
            out.append((at, a))
        at = b
    return out + ([(at, stored)] if at < stored else [])


class SnapshotBank:
    def __init__(self, pool: ModelState, model_config: ModelConfig, device_rows: int, host_rows: int) -> None:
        """Rows for snapshots of ``pool``'s slots: ``device_rows`` beside it, ``host_rows`` in host memory
        (pinned where the pool is on CUDA)."""
        self.device = pool.device
        self.device_rows, self.host_rows = device_rows, host_rows
        self.num_levels, self.low = pool.num_levels, pool.low_level
        self.rows: ModelState | None = None
        if device_rows:
            self.rows = ModelState.allocate(
                model_config, device_rows, self.device, pool.all_conv.dtype,
                state_dtype=pool.all_levels.dtype, num_levels=pool.num_levels,
                token_window=pool.all_window is not None)
        cuda = self.device.type == "cuda"
        levels, *rest = state_stacks(pool)
        self.host_levels: torch.Tensor | None = None  # [rows, stored levels, layers, H, K, V]
        self.host: list[torch.Tensor] = []  # the other kinds [rows, layers, ...], then the positions [rows]
        if host_rows:
            shape = (host_rows, levels.shape[2], levels.shape[0], *levels.shape[3:])
            self.host_levels = torch.zeros(shape, dtype=levels.dtype, pin_memory=cuda)
            self.host = [torch.zeros((host_rows, *t[:, 0].shape), dtype=t.dtype, pin_memory=cuda)
                         for t in rest]
            self.host.append(torch.zeros(host_rows, dtype=torch.int64, pin_memory=cuda))
        self.side = torch.cuda.Stream(self.device) if cuda and host_rows else None
        self._device_busy: dict[int, torch.cuda.Event] = {}  # device row -> its demotion's copy
        self._host_busy: dict[int, torch.cuda.Event] = {}  # host row -> the copy writing it

    @property
    def nbytes(self) -> int:
        device = 0 if self.rows is None else self.rows.nbytes
        host = [self.host_levels] if self.host_levels is not None else []
        return device + sum(t.numel() * t.element_size() for t in host + self.host)

    def copy(self, pool: ModelState, copies: Sequence[StateCopy]) -> None:
        """Run ``copies`` in order."""
        for c in copies:
            runs = live_level_runs(c.position, self.num_levels, self.low)
            if Tier.HOST not in (c.src, c.dst):
                self._on_device(pool, c, runs)
            elif c.src is Tier.DEVICE:
                self._demote(c, runs)
            elif c.src is Tier.SLOT:
                self._wait(self._host_busy.pop(c.dst_index, None))
                self._to_host(pool, c.src_index, c.dst_index, runs)
            elif c.dst is Tier.SLOT:
                self._wait(self._host_busy.pop(c.src_index, None))
                self._from_host(c.src_index, pool, c.dst_index, runs)
            else:
                raise ValueError(f"unsupported snapshot copy {c}")

    def _on_device(self, pool: ModelState, c: StateCopy, runs: list[tuple[int, int]]) -> None:
        """Slot <-> device row: the live level runs, the other kinds whole; the dead levels of a slot
        restored into are zeroed."""
        assert self.rows is not None
        src = pool if c.src is Tier.SLOT else self.rows
        dst = pool if c.dst is Tier.SLOT else self.rows
        if dst is self.rows:
            self._wait(self._device_busy.pop(c.dst_index, None))
        s_levels, d_levels = src.all_levels[:, c.src_index], dst.all_levels[:, c.dst_index]
        for a, b in runs:
            d_levels[:, a:b].copy_(s_levels[:, a:b])
        if dst is pool:
            for a, b in dead_runs(runs, d_levels.shape[1]):
                d_levels[:, a:b].zero_()
        for s, d in zip((*state_stacks(src)[1:], src.positions), (*state_stacks(dst)[1:], dst.positions),
                        strict=True):
            slot_view(d, c.dst_index).copy_(slot_view(s, c.src_index))

    def _demote(self, c: StateCopy, runs: list[tuple[int, int]]) -> None:
        """Device row -> host row, on the side stream after everything queued so far."""
        assert self.rows is not None
        if self.side is None:
            self._to_host(self.rows, c.src_index, c.dst_index, runs)
            return
        self.side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.side):
            self._to_host(self.rows, c.src_index, c.dst_index, runs)
            done = torch.cuda.Event()
            done.record(self.side)
        self._device_busy[c.src_index] = self._host_busy[c.dst_index] = done

    def _to_host(self, state: ModelState, index: int, row: int, runs: list[tuple[int, int]]) -> None:
        """Slot ``index`` of ``state`` -> host row: each block gathered on the device, then one
        non-blocking copy."""
        assert self.host_levels is not None
        levels = state.all_levels[:, index]  # (layers, stored levels, H, K, V)
        for a, b in runs:
            self.host_levels[row, a:b].copy_(levels[:, a:b].transpose(0, 1).contiguous(), non_blocking=True)
        for h, t in zip(self.host, (*state_stacks(state)[1:], state.positions), strict=True):
            block = h[row] if t.dim() > 1 else h[row:row + 1]
            block.copy_(slot_view(t, index).contiguous(), non_blocking=True)

    def _from_host(self, row: int, state: ModelState, index: int, runs: list[tuple[int, int]]) -> None:
        """Host row -> slot ``index``: each block copied to the device without waiting, then into place."""
        assert self.host_levels is not None
        levels = state.all_levels[:, index]
        for a, b in runs:
            block = self.host_levels[row, a:b].to(self.device, non_blocking=True)  # (n, layers, H, K, V)
            levels[:, a:b].copy_(block.transpose(0, 1))
        for a, b in dead_runs(runs, levels.shape[1]):
            levels[:, a:b].zero_()
        for h, t in zip(self.host, (*state_stacks(state)[1:], state.positions), strict=True):
            block = h[row] if t.dim() > 1 else h[row:row + 1]
            slot_view(t, index).copy_(block.to(self.device, non_blocking=True))

    def _wait(self, event: torch.cuda.Event | None) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
