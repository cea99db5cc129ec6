"""Continuous batching over state slots: who runs how many tokens this step. Holds no tensors.

Each step has one token budget (``max_num_batched_tokens``, 2048 by default). Decodes go first (one
token per live sequence, so a decode is never starved), then the next prompt chunk of requests already
prefilling, then new requests from the waiting queue while slots and budget last. The budget bounds a
step's prompt work, and so how much a mixed step delays the decodes in it; a prompt chunk may take all
that the decodes leave (``long_prefill_chunk`` defaults to the budget: on prompt-heavy load that was
faster than smaller chunks, with shorter mixed steps; docs/benchmarks.md). New requests are admitted
first come, first served, except that a request needing more slots than are free (n > 1) lets smaller
ones behind it pass, at most ``max_bypass`` of them; after that the slots that free up are kept for it,
so neither it nor the ones behind it wait forever. The waiting queue holds ``max_waiting`` requests
beyond those the free slots take at once. The runner routes by token count (more than one: chunk path,
exactly one: step path). A request holds ``n`` slots from admission to its end: its prompt runs in
``seqs[0]``'s slot and is forked into the others after the last chunk. ``prompt + max_tokens <=
max_model_len`` is checked on arrival, so a running request never runs out of room and nothing is ever
preempted.

With a prefix cache (engine/prefix_cache.py), a new request restores the deepest cached state on its
prompt's path into its slot instead of a reset and starts its prompt there; prompt chunks end at the
cache's snapshot points; finished sequences are saved before their slots are freed.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .errors import InvalidRequestError, QueueFullError
from .prefix_cache import PrefixCache, SnapshotOps
from .request import Request, RequestStatus, Sequence
from .state_pool import SlotAllocator


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int  # sequences holding a slot at once (<= slots in the pool)
    max_num_batched_tokens: int  # token budget per step, shared by decodes and prompt chunks
    long_prefill_chunk: int  # most prompt tokens one request runs in one step
    max_waiting: int  # bound of the waiting queue beyond the free slots (QueueFullError past it)
    max_bypass: int | None = None  # later requests that may pass one that does not fit; None: max_num_seqs


@dataclass
class ScheduledChunk:
    seq: Sequence  # whose slot absorbs the tokens (seqs[0] for a prompt chunk)
    token_ids: list[int]  # prompt slice, or the one last sampled token of a decode
    is_prompt: bool  # a prompt chunk (else a decode)
    sample: bool  # sample after it: a decode, or the prompt's last chunk


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)  # decodes first, then prompt chunks
    reset_slots: list[int] = field(default_factory=list)  # zero before running (new requests' slot 0)
    forks: list[tuple[int, list[int]]] = field(default_factory=list)  # (src, dsts): copy after the step
    snapshots: SnapshotOps = field(default_factory=SnapshotOps)  # prefix-cache saves and restores
    num_prompt_tokens: int = 0
    num_decode_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_decode_tokens

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """Sequences that get a token this step, in sampler row order (a fork's n samples together)."""
        out: list[Sequence] = []
        for c in self.chunks:
            if c.sample:
                out.extend(c.seq.request.live_seqs if c.is_prompt else [c.seq])
        return out


class Scheduler:
    def __init__(self, config: SchedulerConfig, slots: SlotAllocator,
                 prefix_cache: PrefixCache | None = None) -> None:
        self.config = config
        self.slots = slots
        self.prefix_cache = prefix_cache
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}  # admitted, in admission order
        self.num_running_seqs = 0
        self.max_bypass = config.max_num_seqs if config.max_bypass is None else config.max_bypass
        self._bypassed: dict[str, int] = {}  # request id -> later requests admitted before it

    # ---- queue ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.params.n > min(self.config.max_num_seqs, self.slots.num_slots):
            raise InvalidRequestError(
                f"n={request.params.n} exceeds the {min(self.config.max_num_seqs, self.slots.num_slots)} "
                "sequences the engine can run at once")
        if len(self.waiting) >= self.config.max_waiting + self.slots.num_free:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        self.waiting.append(request)

    def abort(self, request_id: str) -> Request | None:
        """Finish a request with reason "abort" and free its slots now. None if unknown or finished."""
        request = self.running.get(request_id)
        if request is None:
            request = next((r for r in self.waiting if r.request_id == request_id), None)
            if request is None:
                return None
            self.waiting.remove(request)
            self._bypassed.pop(request_id, None)
        for seq in request.live_seqs:
            seq.finish_reason = "abort"
        self.free_finished(request)
        return request

    def free_finished(self, request: Request, fed_last: frozenset[int] = frozenset()) -> None:
        """Return the slots of finished sequences; retire the request once all n are done. fed_last: ids of
        sequences whose last token a decode queued ahead has absorbed (overlap decoding)."""
        for seq in request.seqs:
            if seq.finished and seq.slot >= 0:
                if self.prefix_cache is not None:
                    self.prefix_cache.sequence_finished(seq, seq.seq_id in fed_last)
                self.slots.free(seq.slot)
                seq.slot = -1
                self.num_running_seqs -= 1
        if request.finished:
            request.status = RequestStatus.FINISHED
            self.running.pop(request.request_id, None)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.prefix_cache is not None:
            self.prefix_cache.begin_step()
        budget = self.config.max_num_batched_tokens
        for request in self.running.values():
            if request.status is not RequestStatus.DECODE:
                continue
            for seq in request.live_seqs:
                if budget == 0:
                    break
                out.chunks.append(ScheduledChunk(seq, [seq.token_ids[-1]], is_prompt=False, sample=True))
                out.num_decode_tokens += 1
                budget -= 1
        for request in self.running.values():
            if budget == 0:
                break
            if request.status is RequestStatus.PREFILL:
                budget -= self._schedule_prompt_chunk(request, budget, out)
        now = time.monotonic()
        blocked: list[Request] = []  # waiting requests passed over this step, in queue order
        for request in list(self.waiting):
            if budget == 0 or self.slots.num_free == 0 or self.num_running_seqs >= self.config.max_num_seqs:
                break
            n = request.params.n
            if self.num_running_seqs + n > self.config.max_num_seqs or self.slots.num_free < n:
                if self._bypassed.get(request.request_id, 0) >= self.max_bypass:
                    break  # passed often enough: the slots that free up are kept for it
                blocked.append(request)
                continue
            self.waiting.remove(request)
            self._bypassed.pop(request.request_id, None)
            for b in blocked:
                self._bypassed[b.request_id] = self._bypassed.get(b.request_id, 0) + 1
            for seq in request.seqs:
                seq.slot = self.slots.allocate()
            self.num_running_seqs += n
            request.status = RequestStatus.PREFILL
            request.scheduled_time = now
            self.running[request.request_id] = request
            self._restore_or_reset(request, out)
            budget -= self._schedule_prompt_chunk(request, budget, out)
        if self.prefix_cache is not None:
            out.snapshots = self.prefix_cache.take_ops()
        return out

    def _restore_or_reset(self, request: Request, out: SchedulerOutput) -> None:
        """Start a new request's slot from the deepest cached state of its prompt, or from zero."""
        slot = request.seqs[0].slot
        cached = 0 if self.prefix_cache is None else self.prefix_cache.restore(request, slot)
        if cached:
            request.num_computed_tokens = request.num_cached_tokens = cached
        else:
            out.reset_slots.append(slot)

    def _schedule_prompt_chunk(self, request: Request, budget: int, out: SchedulerOutput) -> int:
        start = request.num_computed_tokens
        size = min(request.num_prompt_tokens - start, self.config.long_prefill_chunk, budget)
        if self.prefix_cache is not None:
            size = min(size, self.prefix_cache.next_point(request, start) - start)
            self.prefix_cache.prompt_chunk_done(request, start + size, request.seqs[0].slot)
        request.num_computed_tokens += size
        last = request.num_computed_tokens == request.num_prompt_tokens
        out.chunks.append(ScheduledChunk(request.seqs[0], request.prompt_token_ids[start:start + size],
                                         is_prompt=True, sample=last))
        out.num_prompt_tokens += size
        if last:
            request.status = RequestStatus.DECODE
            if len(request.seqs) > 1:
                out.forks.append((request.seqs[0].slot, [s.slot for s in request.seqs[1:]]))
        return size
