"""CUDA graphs of prompt steps (prefill), one per step shape: the prompt lengths and start positions.

At small batches a prompt step is bound by the host: about 340 launches from Python (20-40 ms on the
H200's host) for about 2 ms of device work at batch 1 and 512 tokens. What a prefill launches depends
only on its shape, the tuple of (length, start position) of its sequences (``Model.plan_prefill``: the
chunk plan, the window rows, every grid), not on the tokens or the slots, which the kernels read from
device memory. So a step replays from a graph over static buffers of token ids and slots.

Shapes that repeat: new requests of the same prompt length (fixed-length benchmarks, templated
prompts), and the chunks of long prompts, which the scheduler cuts at the same positions (lengths
long_prefill_chunk from 0, long_prefill_chunk, ...) whenever one runs alone.

A graph is captured the second time its shape runs, right after running it eagerly (which also
compiles every kernel it needs and builds the chunk plan the graph keeps); the first time runs
eagerly, so shapes that never repeat cost only a counter. At most ``max_graphs`` graphs are kept (least
recently used dropped), each of at most ``max_tokens`` tokens, all in one memory pool.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels

logger = logging.getLogger(__name__)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [N, vocab], written by each replay
    keep: tuple  # the prefill plan and the chunk plan: device tensors the graph reads


class SecondSighting:
    """Counts keys, least recently seen dropped past ``capacity``: ``see(key)`` is True from a key's
    second time on (while it is still remembered)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.counts: OrderedDict[tuple, int] = OrderedDict()

    def see(self, key: tuple) -> bool:
        n = self.counts.pop(key, 0) + 1
        self.counts[key] = n
        while len(self.counts) > self.capacity:
            self.counts.popitem(last=False)
        return n >= 2

    def forget(self, key: tuple) -> None:
        self.counts.pop(key, None)


class PrefillGraphs:
    def __init__(self, model: Any, state: Any, device: torch.device, max_graphs: int, max_tokens: int,
                 max_seqs: int) -> None:
        self.model, self.state, self.device = model, state, device
        self.max_graphs, self.max_tokens, self.max_seqs = max_graphs, max_tokens, max_seqs
        self.ids = torch.zeros(max_tokens, dtype=torch.long, device=device)
        self.slots = torch.zeros(max_seqs, dtype=torch.long, device=device)
        self.host = torch.zeros(max_tokens + max_seqs, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        self.copied = torch.cuda.Event()  # recorded after each copy out of ``host``
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.seen = SecondSighting(16 * max_graphs)
        self.pool = torch.cuda.graph_pool_handle()
        self.num_captures = self.num_replays = 0

    def run(self, token_ids: list[int], lens: list[int], slots: list[int],
            starts: list[int]) -> torch.Tensor | None:
        """A prefill of ``lens`` tokens per sequence (``token_ids`` packed) into ``slots`` from positions
        ``starts`` (the slots' positions; a new request's slot reset) -> logits [N, vocab] (a view, valid
        until the same shape runs again), or None where the caller must run it eagerly (first sighting,
        too large)."""
        key, T, N = (tuple(lens), tuple(starts)), len(token_ids), len(lens)
        if T != sum(lens) or N != len(slots) or N != len(starts):
            raise ValueError(f"prefill graph: {T} tokens, {len(slots)} slots and {len(starts)} starts for "
                             f"lengths {lens}")
        if T > self.max_tokens or N > self.max_seqs:
            return None
        entry = self.graphs.get(key)
        if entry is None and not self.seen.see(key):
            return None
        self._load(token_ids, slots)
        if entry is None:
            return self._capture(key, T, N)
        self.graphs.move_to_end(key)
        entry.graph.replay()
        self.num_replays += 1
        return entry.logits

    def _load(self, token_ids: list[int], slots: list[int]) -> None:
        T, N, at = len(token_ids), len(slots), self.max_tokens
        self.copied.synchronize()  # the previous step's copies are out of the pinned buffer
        self.host_np[:T] = token_ids
        self.host_np[at:at + N] = slots
        self.ids[:T].copy_(self.host[:T], non_blocking=True)
        self.slots[:N].copy_(self.host[at:at + N], non_blocking=True)
        self.copied.record()

    def _capture(self, key: tuple, T: int, N: int) -> torch.Tensor:
        """Run the step eagerly from the static buffers (its result is returned), then capture it."""
        start = time.perf_counter()
        ids, slots, model = self.ids[:T], self.slots[:N], self.model
        lens, starts = key
        cu = torch.tensor([0, *itertools.accumulate(lens)])
        plan = model.plan_prefill(cu, self.state, slots, list(starts), T)
        with kernels.chunk_plan_cache(self.device, known=[(plan.cu, plan.bounds)]):
            logits = model.run_prefill(ids, self.state, slots, plan)
            graph = torch.cuda.CUDAGraph()
            # thread_local: the server's other threads may touch CUDA while this one captures
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = model.run_prefill(ids, self.state, slots, plan)
            keep = (plan, kernels.held_chunk_plan())
        self.graphs[key] = _Graph(graph, out, keep)
        self.seen.forget(key)
        self.num_captures += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        shape = f"lengths {list(lens)} from {list(starts)}" if N <= 4 else f"{N} sequences, {T} tokens"
        logger.info("captured a prefill CUDA graph for %s in %.2f s (%d kept)", shape,
                    time.perf_counter() - start, len(self.graphs))
        return logits
