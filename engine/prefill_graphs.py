"""CUDA graphs of prompt steps, captured at start-up, one per bucket of padded shape (``PrefillShape``).

Run eagerly, a prompt step costs a few hundred launches from Python whatever its size: at small
batches, host time many times the device's (docs/benchmarks.md). What a step launches depends only on
its padded token count, its padded sequence count and whether any sequence continues from a stored
state: the lengths, start positions, slots and tokens are data that the kernels read from one device
buffer (engine/prefill_batch.py). So a step runs as: fill the bucket's plan on the host (O(chunks)), one copy
into the static buffer, one graph replay.

Buckets: token counts of powers of two and the halfway points above 256 (a step pads at most a third
of its tokens there), up to the largest step; sequence counts 1, 2, 4, ... (the bucket holds one more,
the padding sequence); each fresh (every sequence from position 0) and continuing. A step larger than
every bucket runs eagerly. The graphs share one memory pool and one logits buffer; their number, time
and memory are logged at start-up.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch

from ..kernels.state import max_positions
from .prefill_batch import PrefillBatch, PrefillShape, fill, fits, prefill_arrays

logger = logging.getLogger(__name__)


def token_buckets(max_tokens: int, smallest: int = 16) -> list[int]:
    """Powers of two from ``smallest`` and, from 256 on, the points halfway to the next, up to the first
    that holds ``max_tokens``."""
    sizes, n = [], smallest
    while True:
        for size in (n, n + n // 2) if n >= 256 else (n,):
            sizes.append(size)
            if size >= max_tokens:
                return sizes
        n *= 2


def bucket_shapes(max_tokens: int, max_seqs: int, max_len: int) -> list[PrefillShape]:
    """Every bucket for steps of at most ``max_tokens`` tokens in at most ``max_seqs`` sequences of at
    most ``max_len`` positions: a prompt chunk has at least two tokens (one goes to the decode path), so
    N sequences need 2N tokens, and the N + 1 sequences of a bucket hold at most (N + 1) max_len."""
    seqs, n = [], 1
    while n < max_seqs:
        seqs.append(n)
        n *= 2
    seqs.append(max_seqs)
    return [PrefillShape(t, n + 1, continuing) for t in token_buckets(max_tokens) for n in seqs
            if 2 * n <= t <= (n + 1) * max_len for continuing in (False, True)]


class PrefillGraphs:
    def __init__(self, model: Any, state: Any, device: torch.device, max_tokens: int, max_seqs: int,
                 pad_slot: int) -> None:
        """Capture every bucket of steps of up to ``max_tokens`` tokens in ``max_seqs`` sequences; the
        padding sequences write into ``pad_slot`` (the pool's dummy slot)."""
        self.model, self.state, self.device, self.pad_slot = model, state, device, pad_slot
        self.window, self.num_levels = state.all_window is not None, state.num_levels
        self.shapes = bucket_shapes(max_tokens, max_seqs, max_positions(self.num_levels))
        size = max(self._layout(s).offsets[-1] for s in self.shapes)
        self.buffer = torch.zeros(size, dtype=torch.int64, device=device)  # every graph reads its step here
        self.host = torch.zeros(size, dtype=torch.int64, pin_memory=True)
        self.host_np = self.host.numpy()
        self.copied = torch.cuda.Event()  # recorded after each copy out of ``host``
        self.logits = torch.empty(max(s.num_seqs for s in self.shapes), model.config.vocab_size,
                                  dtype=torch.float32, device=device)
        self.graphs: dict[PrefillShape, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.num_replays = 0
        self._capture_all()

    def _arrays(self, token_ids: list[int], slots: list[int], starts: list[int], lens: list[int],
                shape: PrefillShape) -> tuple[list[np.ndarray], Any]:
        return prefill_arrays(token_ids, slots, starts, lens, num_levels=self.num_levels, window=self.window,
                              chunk_plan=True, pad=shape, pad_slot=self.pad_slot)

    def _layout(self, shape: PrefillShape) -> Any:
        return self._arrays([], [], [], [], shape)[1]

    def _load(self, parts: list[np.ndarray], layout: Any) -> PrefillBatch:
        """The step into the static buffer: one copy through the pinned host buffer (after the previous
        step's copy out of it)."""
        total = layout.offsets[-1]
        self.copied.synchronize()
        fill(self.host_np, parts, layout)
        self.buffer[:total].copy_(self.host[:total], non_blocking=True)
        self.copied.record()
        return PrefillBatch.bind(self.buffer, layout, parts[2].tolist(), parts[4].tolist())

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start, before = time.perf_counter(), torch.cuda.memory_reserved(self.device)
        for shape in sorted(self.shapes, key=lambda s: (-s.num_tokens, -s.num_seqs)):  # largest first
            batch = self._load(*self._arrays([], [], [], [], shape))  # padding alone: the same launches
            self.model.run_prefill(batch, self.state)  # compiles every kernel outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.model.run_prefill(batch, self.state)
                self.logits[:shape.num_seqs].copy_(out)
            self.graphs[shape] = graph
        self.state.reset(torch.tensor([self.pad_slot], device=self.device))
        torch.cuda.synchronize(self.device)
        logger.info("captured %d prompt-step CUDA graphs (up to %d tokens in %d sequences) in %.1f s, "
                    "%.0f MiB", len(self.graphs), max(s.num_tokens for s in self.shapes),
                    max(s.num_seqs for s in self.shapes) - 1, time.perf_counter() - start,
                    (torch.cuda.memory_reserved(self.device) - before) / 2**20)

    def shape_for(self, num_tokens: int, num_seqs: int, continuing: bool) -> PrefillShape | None:
        """The smallest bucket that holds a step (fresh steps in fresh buckets), or None."""
        holds = [s for s in self.shapes if s.continuing == continuing
                 and fits(s, num_tokens, num_seqs, continuing, self.num_levels)]
        return min(holds, key=lambda s: (s.num_tokens, s.num_seqs)) if holds else None

    def run(self, token_ids: list[int], slots: list[int], starts: list[int],
            lens: list[int]) -> torch.Tensor | None:
        """A prompt step from its bucket's graph -> logits [N, vocab] (a view, valid until the next prompt
        step), or None where no bucket holds it (the caller runs it eagerly)."""
        shape = self.shape_for(len(token_ids), len(lens), any(starts))
        if shape is None:
            return None
        self._load(*self._arrays(token_ids, slots, starts, lens, shape))
        self.graphs[shape].replay()
        self.num_replays += 1
        return self.logits[:len(lens)]
