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
        # one device buffer holds the graphs' input ids (row 0) and slots (row 1); a pinned twin on the
        # host takes a step's values from Python lists, so a step costs one host-to-device copy
        self.inputs = torch.zeros(2, max_bs, dtype=torch.long, device=device)  # (2, max_bs)
        self.inputs[1].fill_(dummy_slot)
        self.input_ids, self.slots = self.inputs[0], self.inputs[1]
        self.host = torch.zeros(2, max_bs, dtype=torch.long, pin_memory=True)
        self.host_np = self.host.numpy()
        self.copied = torch.cuda.Event()  # recorded after each copy out of ``host``
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

    def run(self, input_ids: list[int], slots: list[int]) -> torch.Tensor:
        """One decode step for N <= the largest captured size -> logits [N, vocab] (a view, valid until
        the next run). The ids and slots are written into the pinned host buffer and moved in one copy
        (after waiting for the previous step's copy out of that buffer, normally long done); the rows
        past N up to the captured size point at the dummy slot."""
        n = len(input_ids)
        bs = next(s for s in self.sizes if s >= n)
        self.copied.synchronize()
        self.host_np[0, :n] = input_ids
        self.host_np[1, :n] = slots
        self.host_np[0, n:bs] = 0
        self.host_np[1, n:bs] = self.dummy_slot
        self.inputs[:, :bs].copy_(self.host[:, :bs], non_blocking=True)
        self.copied.record()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]

    def run_next(self, input_ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """``run`` with the ids [N] already on the device (tokens just sampled, not yet read by the host):
        only the slots go through the pinned buffer. -> logits [N, vocab] (a view, as for ``run``)."""
        n = len(slots)
        if input_ids.shape != (n,):
            raise ValueError(f"run_next: {n} slots but ids of shape {tuple(input_ids.shape)}")
        bs = next(s for s in self.sizes if s >= n)
        self.copied.synchronize()
        self.host_np[1, :n] = slots
        self.host_np[1, n:bs] = self.dummy_slot
        self.slots[:bs].copy_(self.host[1, :bs], non_blocking=True)
        self.copied.record()
        self.input_ids[:n].copy_(input_ids)
        self.input_ids[n:bs].zero_()
        self.graphs[bs].replay()
        return self.outputs[bs][:n]
