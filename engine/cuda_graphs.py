"""CUDA graphs of the decode step (model.decode) for a fixed set of batch sizes.

Static buffers hold the input ids and slots; a batch of N runs the smallest captured size >= N with
the padding rows pointed at the pool's dummy slot (token 0). The dummy slot's position is zeroed
inside the graph before each step, so padding never walks the dummy past level 0 and never touches a
request's state. Warm-up runs on a side stream (compiles / autotunes the kernels), then each size is
captured, largest first, into one shared memory pool. The prompt path stays eager.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model: Any, state: Any, dummy_slot: int, sizes: list[int], device: torch.device,
                 warmup_steps: int = 2) -> None:
        self.model = model
        self.state = state
        self.dummy_slot = dummy_slot
        self.sizes = sorted(set(sizes))
        max_bs = self.sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)  # (max_bs,)
        self.slots = torch.full((max_bs,), dummy_slot, dtype=torch.long, device=device)  # (max_bs,)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # bs -> (bs, vocab) logits written by the graph
        start = time.perf_counter()
        self._capture(warmup_steps)
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s", self.sizes,
                    time.perf_counter() - start)

    def _step(self, bs: int) -> torch.Tensor:
        self.state.positions[self.dummy_slot:self.dummy_slot + 1].zero_()
        return self.model.decode(self.input_ids[:bs], self.state, self.slots[:bs])

    @torch.inference_mode()
    def _capture(self, warmup_steps: int) -> None:
        pool = None
        for bs in reversed(self.sizes):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup_steps):
                    self._step(bs)
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[bs] = self._step(bs)
            if pool is None:
                pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def can_run(self, n: int) -> bool:
        return 0 < n <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """input_ids, slots: [N] on the device -> logits [N, vocab] (a view, valid until the next run)."""
        n = input_ids.shape[0]
        bs = next(s for s in self.sizes if s >= n)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.slots[:n].copy_(slots, non_blocking=True)
        if bs > n:
            self.input_ids[n:bs].zero_()
            self.slots[n:bs].fill_(self.dummy_slot)
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
