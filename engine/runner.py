"""The model runner: turns a SchedulerOutput into model calls on the state pool; owns the step's tensors.

Routing is by token count: chunks of more than one token are packed into one ``model.prefill``
(varlen, cu_seqlens), chunks of exactly one token (decodes, and one-token prompt remainders) go
through ``model.decode`` -- replayed from a CUDA graph when one is captured for the batch size.
Forks (n > 1) copy a finished prompt's slot into the request's other slots after both calls.
Prefix-cache snapshots (engine/state_snapshot.py) are copied at three points of the step: saves of freed
slots before the resets, restores into new slots after them, saves of prompt chunk ends after the forks.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import kernels
from .config import EngineConfig
from .cuda_graphs import DecodeGraphs
from .model_state import device_ints
from .prefill_graphs import PrefillGraphs
from .prefix_cache import StateCopy
from .scheduler import SchedulerOutput
from .state_pool import StatePool

Speculated = tuple[list[int], torch.Tensor]  # (seq ids in row order, logits [N, vocab]) of a decode_next


class ModelRunner:
    def __init__(self, model: Any, pool: StatePool, config: EngineConfig) -> None:
        self.model = model
        self.pool = pool
        self.state = pool.state
        self.device = config.torch_device
        self.num_prefill_calls = 0  # model.prefill calls so far (tests count forks against it)
        self.num_decode_calls = 0
        self.graphs: DecodeGraphs | None = None
        model.fuse_gate_up()  # one GEMM for gate and up
        if self.device.type == "cuda":
            self._warm_up_prefill(int(config.max_model_len or model.config.max_model_len))
        if config.use_cuda_graphs:
            sizes = sorted({min(s, pool.num_slots) for s in config.cuda_graph_batch_sizes or ()})
            self.graphs = DecodeGraphs(model, self.state, pool.dummy_slot, sizes, self.device)
        self.prefill_graphs: PrefillGraphs | None = None
        if config.use_cuda_graphs and config.prefill_graph_max_tokens and kernels.has_triton():
            self.prefill_graphs = PrefillGraphs(
                model, self.state, self.device, config.prefill_graph_max_tokens,
                min(config.prefill_graph_max_seqs, pool.num_slots), pool.dummy_slot)

    @torch.inference_mode()
    def _warm_up_prefill(self, max_model_len: int) -> None:
        """Compile the prompt path's kernels at start-up rather than inside the first request: a short
        prompt in the dummy slot from an empty state, then a continuation of it (the initial-state
        kernels), then the slot is zeroed again. Both fit the engine's max_model_len, which sized the
        pool's levels (not the model's, which may be longer)."""
        slot = self.pool.dummy_slot
        n = max(1, min(70, max_model_len // 2))
        slots = self._tensor([slot])
        for start in (0, n):
            self.model.prefill(self._tensor([0] * n), torch.tensor([0, n]), self.state, slots, [start])
        self.state.reset(slots)
        torch.cuda.synchronize(self.device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return device_ints(values, self.device)

    def _reset(self, slots: list[int], rewritten: set[int]) -> None:
        """Zero new requests' slots before the step. A prefill whose sequences all start empty writes
        every level of its slots (``model.prefill``'s fresh path), so slots in ``rewritten`` only get
        their conv states and positions zeroed: a fresh 512-token batch of 16 would otherwise also
        write 16 x 11 MiB of zeros per layer just before overwriting them."""
        keep = [s for s in slots if s in rewritten]
        zero = [s for s in slots if s not in rewritten]
        if keep:
            self.state.reset(self._tensor(keep), levels=False)
        if zero:
            self.state.reset(self._tensor(zero))

    def copy_snapshots(self, copies: list[StateCopy]) -> None:
        """Prefix-cache copies between slots and snapshot rows, queued in order (no host synchronisation)."""
        if copies:
            assert self.pool.snapshots is not None, "snapshot copies without snapshot rows"
            self.pool.snapshots.copy(self.state, copies)

    def decode(self, input_ids: list[int], slots: list[int], eager: bool = False) -> torch.Tensor:
        """One token for each of N slots -> logits [N, vocab]; a CUDA graph unless eager or none fits N."""
        self.num_decode_calls += 1
        if self.graphs is not None and not eager and self.graphs.can_run(len(input_ids)):
            return self.graphs.run(input_ids, slots)
        return self.model.decode(self._tensor(input_ids), self.state, self._tensor(slots))

    def decode_next(self, input_ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
        """``decode`` with the ids [N] on the device (tokens just sampled, not yet read by the host):
        queued without waiting for the host, so the device runs it while the host handles the step
        that sampled them. -> logits [N, vocab]."""
        self.num_decode_calls += 1
        if self.graphs is not None and self.graphs.can_run(len(slots)):
            return self.graphs.run_next(input_ids, slots)
        return self.model.decode(input_ids, self.state, self._tensor(slots))

    def _prefill(self, chunks: list, lens: list[int], starts: list[int]) -> torch.Tensor:
        """One prompt step of the chunks (N >= 1 tokens each) -> logits [N, vocab], replayed from the CUDA
        graph of its bucket where one holds it (engine/prefill_graphs.py), else run eagerly."""
        token_ids = [t for c in chunks for t in c.token_ids]
        slots = [c.seq.slot for c in chunks]
        if self.prefill_graphs is not None:
            logits = self.prefill_graphs.run(token_ids, slots, starts, lens)
            if logits is not None:
                return logits
        batch = self.model.prefill_batch(token_ids, slots, starts, lens, self.state)
        return self.model.run_prefill(batch, self.state)

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput, speculated: Speculated | None = None) -> torch.Tensor:
        """Run one step -> logits [M, vocab] of the chunks with sample=True, in chunk order.

        speculated: (seq ids, logits) of a ``decode_next`` already queued for this step: its rows serve
        the step's decode chunks (each of which must be among them) and only the prompt chunks run.
        """
        parts: list[torch.Tensor] = []
        row_of: dict[int, int] = {}  # chunk index -> row in cat(parts)
        todo = range(len(out.chunks))
        if speculated is not None:
            decodes = [i for i, c in enumerate(out.chunks) if not c.is_prompt]
            where = {sid: r for r, sid in enumerate(speculated[0])}
            missing = [out.chunks[i].seq.seq_id for i in decodes if out.chunks[i].seq.seq_id not in where]
            if missing:
                raise RuntimeError(f"decodes of sequences {missing} were not in the speculated step")
            take = [where[out.chunks[i].seq.seq_id] for i in decodes]
            todo = [i for i, c in enumerate(out.chunks) if c.is_prompt]
            ready = speculated[1]
            if take != list(range(ready.shape[0])):
                ready = ready.index_select(0, self._tensor(take))
            elif todo:  # a graph replay below may write over the view
                ready = ready.clone()
            parts.append(ready)
            row_of.update((i, r) for r, i in enumerate(decodes))
        multi = [i for i in todo if len(out.chunks[i].token_ids) > 1]
        single = [i for i in todo if len(out.chunks[i].token_ids) == 1]
        lens = [len(out.chunks[i].token_ids) for i in multi]
        # a prompt chunk's tokens are counted as computed when scheduled: it starts before them
        starts = [out.chunks[i].seq.request.num_computed_tokens - n for i, n in zip(multi, lens, strict=True)]
        self.copy_snapshots(out.snapshots.before)
        if out.reset_slots:
            fresh = not any(starts)  # then model.prefill writes every level of its slots
            self._reset(out.reset_slots, {out.chunks[i].seq.slot for i in multi} if fresh else set())
        self.copy_snapshots(out.snapshots.restores)
        if multi:
            self.num_prefill_calls += 1
            base = sum(p.shape[0] for p in parts)
            parts.append(self._prefill([out.chunks[i] for i in multi], lens, starts))  # (N, vocab)
            row_of.update((i, base + r) for r, i in enumerate(multi))
        if single:
            ids_1 = [out.chunks[i].token_ids[0] for i in single]
            base = sum(p.shape[0] for p in parts)
            parts.append(self.decode(ids_1, [out.chunks[i].seq.slot for i in single]))  # (N, vocab)
            row_of.update((i, base + r) for r, i in enumerate(single))
        for src, dsts in out.forks:
            self.state.copy_(src, self._tensor(dsts))
        self.copy_snapshots(out.snapshots.after)
        rows = [row_of[i] for i, c in enumerate(out.chunks) if c.sample]
        if not rows:
            return torch.empty(0, 0, device=self.device)
        logits = parts[0] if len(parts) == 1 else torch.cat(parts)
        if rows == list(range(logits.shape[0])):  # every row, in order: the common decode step
            return logits
        return logits.index_select(0, self._tensor(rows))
