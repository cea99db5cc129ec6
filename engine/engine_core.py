"""EngineCore: the one step loop body shared by LLM (offline) and AsyncLLM (online). Single-threaded.

step(): schedule (no tensors) -> run the model on the state pool -> sample -> detokenize and check stop
conditions -> free finished slots -> emit EngineStats to listeners -> return RequestOutputs.

One request cannot stop the step: an exception while sampling or processing one request's tokens ends
that request with finish_reason "error" (RequestOutput.error says why) and the others go on. What fails
outside a request's own work (scheduling, the model's forward) propagates: the engine cannot go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .config import EngineConfig
from .errors import InvalidRequestError
from .grammar import compiler_for
from .input_processor import InputProcessor
from .output_processor import OutputProcessor
from .outputs import RequestOutput
from .prefix_cache import PrefixCache, PrefixCacheConfig
from .request import Request, RequestStatus
from .sampler import Sampler, SamplerOutput, TokenMask
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from .state_pool import StatePool, prefill_headroom_bytes
from .stats import EngineStats, FinishedRequestStats
from .structured_output import GRAMMAR_ERROR, StructuredOutputs

if TYPE_CHECKING:
    from . import request
    from .runner import Speculated

logger = logging.getLogger(__name__)

StatsListener = Callable[[EngineStats], None]


def make_prefix_cache(pool: StatePool, interval: int) -> PrefixCache | None:
    """The prefix cache over the pool's snapshot rows, or None where it has none (caching off)."""
    bank = pool.snapshots
    if bank is None:
        return None
    return PrefixCache(PrefixCacheConfig(bank.device_rows, bank.host_rows, pool.bytes_per_slot, interval))


class EngineCore:
    def __init__(self, config: EngineConfig, model: Any = None, tokenizer: Any = None,
                 detokenize: bool = True) -> None:
        from .runner import ModelRunner

        self.config = config
        self.model_config = config.model_config
        if model is None or tokenizer is None:
            from .loader import load_model

            model, tokenizer = load_model(config.model, device=config.torch_device, dtype=config.torch_dtype)
        self.model, self.tokenizer = model, tokenizer
        mc = self.model_config
        headroom = prefill_headroom_bytes(mc, config.max_num_seqs, int(config.max_num_batched_tokens or 0))
        caching = config.enable_prefix_caching
        self.pool = StatePool(mc, max_num_seqs=config.max_num_seqs, device=config.torch_device,
                              dtype=config.torch_dtype, state_dtype=config.torch_state_dtype,
                              memory_fraction=config.memory_fraction, headroom_bytes=headroom,
                              max_model_len=int(config.max_model_len or mc.max_model_len),
                              snapshot_bytes=int(config.prefix_cache_bytes or 0) if caching else 0,
                              snapshot_host_bytes=int(config.prefix_cache_host_bytes or 0) if caching else 0)
        self.prefix_cache = make_prefix_cache(self.pool, config.prefix_cache_interval)
        self.scheduler = Scheduler(SchedulerConfig(
            max_num_seqs=self.pool.num_slots, max_num_batched_tokens=int(config.max_num_batched_tokens or 0),
            long_prefill_chunk=config.long_prefill_chunk, max_waiting=config.max_waiting),
            self.pool.allocator, self.prefix_cache)
        self.runner = ModelRunner(model, self.pool, config)
        self.sampler = Sampler(config.torch_device, config.seed)
        # detokenize=False: the engine-core process, whose API servers turn token ids into text
        self.outputs = OutputProcessor(tokenizer, int(config.max_model_len or 0), detokenize)
        eos = set(mc.eos_token_ids)
        if tokenizer.eos_token_id is not None:
            eos.add(tokenizer.eos_token_id)
        self.grammars = compiler_for(tokenizer, mc.vocab_size, sorted(eos))  # None: cannot
        self.inputs = InputProcessor(tokenizer, max_model_len=int(config.max_model_len or mc.max_model_len),
                                     vocab_size=mc.vocab_size, eos_token_ids=frozenset(eos),
                                     max_num_seqs=self.scheduler.config.max_num_seqs, grammars=self.grammars)
        self.max_prompt_chars = self.inputs.max_prompt_chars
        self.structured = StructuredOutputs(self.grammars, config.torch_device, self.pool.num_slots)
        self.requests: dict[str, Request] = {}  # unfinished, by id
        self.stats_listeners: list[StatsListener] = []
        self._pending_finished: list[FinishedRequestStats] = []  # aborts between steps
        # the next decode step, queued on the device while the host handled this one (overlap_decode)
        self._speculated: Speculated | None = None
        self.num_steps = 0

    # ---- requests ------------------------------------------------------------------------------
    def make_request(self, request_id: str, prompt: str | Sequence[int], params: SamplingParams) -> Request:
        """Validate and tokenize (engine/input_processor.py), compile a grammar (cached); raises
        InvalidRequestError / PromptTooLongError. Thread-safe (no state); its cost grows with the prompt,
        so the online engine runs it off the event loop."""
        return self.inputs.make_request(request_id, prompt, params)

    def add_request(self, request: Request) -> None:
        """Queue a request (QueueFullError when the waiting queue is full)."""
        if request.request_id in self.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running")
        self.scheduler.add(request)
        self.requests[request.request_id] = request
        self.outputs.add(request)
        self.structured.add(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish a request with "abort" and free its slots now; its final output, or None if unknown."""
        request = self.scheduler.abort(request_id)
        if request is None:
            return None
        now = time.monotonic()
        self._pending_finished.append(self._finished_stats(request, now, "abort"))
        return self._retire(request)

    def finish_sample(self, request_id: str, index: int) -> RequestOutput | None:
        """End one decoding sample with "stop" (a stop string its API server matched in the text) and free
        its slot now; the request's final output once all its samples are done, else None."""
        request = self.requests.get(request_id)
        if request is None or request.status is not RequestStatus.DECODE or not 0 <= index < request.params.n:
            return None
        seq = request.seqs[index]
        if seq.finished:
            return None
        seq.finish_reason = "stop"
        self.scheduler.free_finished(request, self._fed_last())
        if not request.finished:
            return None
        self._pending_finished.append(self._finished_stats(request, time.monotonic(), None))
        return self._retire(request)

    def _retire(self, request: Request, error: str | None = None) -> RequestOutput:
        out = self.outputs.make_output(request)
        out.error = error
        self.requests.pop(request.request_id, None)
        self.outputs.release(request)
        self.structured.release(request)
        for seq in request.seqs:
            self.sampler.release(seq)
        return out

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def add_stats_listener(self, fn: StatsListener) -> None:
        self.stats_listeners.append(fn)

    # ---- one step ------------------------------------------------------------------------------
    def step(self, stream: bool = True) -> list[RequestOutput]:
        """One engine step -> outputs of the requests that got tokens (only finished ones unless stream)."""
        sched = self.scheduler.schedule()
        stats = EngineStats(num_prompt_tokens=sched.num_prompt_tokens, iteration_tokens=sched.num_tokens,
                            finished=self._pending_finished)
        self._pending_finished = []
        outputs: list[RequestOutput] = []
        if not sched.chunks:
            self.runner.copy_snapshots([*sched.snapshots.before, *sched.snapshots.restores])
        else:
            touched, failed = self._run(sched, stats)
            fed_last = self._fed_last()
            for request in touched:
                error = failed.get(request.request_id)
                if error is not None:
                    self._fail(request, error)
                self.scheduler.free_finished(request, fed_last)
                if request.finished:
                    stats.finished.append(self._finished_stats(request, time.monotonic(), None))
                    outputs.append(self._retire(request, error))
                elif stream:
                    outputs.append(self.outputs.make_output(request))
        self.num_steps += 1
        self._emit(stats)
        return outputs

    def _run(self, sched: SchedulerOutput, stats: EngineStats) -> tuple[list[Request], dict[str, str]]:
        """The step's model call, sampling and output processing -> (requests that got tokens, errors of
        those that failed, by request id)."""
        speculated, self._speculated = self._speculated, None
        logits = self.runner.execute(sched, speculated)  # (M, vocab), one row per sampling chunk
        seqs = sched.sampled_seqs
        repeats = [len(c.seq.request.live_seqs) if c.is_prompt else 1 for c in sched.chunks if c.sample]
        if seqs and any(r > 1 for r in repeats):  # n > 1: a finished prompt's row feeds all its samples
            logits = logits.repeat_interleave(torch.tensor(repeats, device=logits.device), dim=0)
        failed: dict[str, str] = {}
        # the host fills the grammars' masks while the device runs the forward queued above
        mask = self.structured.masks(seqs)
        sampled = self._sample(logits, seqs, sched, failed, mask) if seqs else None
        now = time.monotonic()
        touched: dict[str, Request] = {}
        for i, seq in enumerate(seqs):
            assert sampled is not None
            request = seq.request
            touched[request.request_id] = request
            if request.request_id in failed:
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
                if seq.index == 0:
                    stats.time_to_first_tokens.append(now - request.arrival_time)
            else:
                stats.inter_token_latencies.append(now - (seq.last_token_time or now))
            seq.last_token_time = now
            try:
                ended = self.structured.accept(seq, sampled.token_ids[i]) if mask is not None else None
                if ended is None or ended[0] != GRAMMAR_ERROR:  # a dead end's token is not the sequence's
                    self.outputs.process(seq, sampled.token_ids[i], sampled.logprobs[i])
                if ended is not None:
                    self.outputs.finish(seq, *ended)
            except Exception as e:  # detokenizing or matching one request's text: only it fails
                failed[request.request_id] = self._log_failure(request, "processing its output", e)
        stats.num_generation_tokens = len(seqs)
        return list(touched.values()), failed

    def _sample(self, logits: torch.Tensor, seqs: list[request.Sequence], sched: SchedulerOutput,
                failed: dict[str, str], mask: TokenMask | None) -> SamplerOutput:
        """Sample the batch; if that raises, sample row by row and fail only the rows that raise."""
        try:
            return self.sampler.sample(logits, seqs, self._speculate(sched, seqs), mask)
        except Exception:
            if self._speculated is not None:  # the next step is queued from these tokens: cannot redo them
                raise
        token_ids: list[int] = []
        logprobs: list = []
        for i, seq in enumerate(seqs):
            try:
                row_mask = (None, mask.row(i)) if mask is not None else ()
                one = self.sampler.sample(logits[i:i + 1], [seq], *row_mask)
                token_ids.append(one.token_ids[0])
                logprobs.append(one.logprobs[0])
            except Exception as e:
                failed[seq.request.request_id] = self._log_failure(seq.request, "sampling", e)
                token_ids.append(0)
                logprobs.append(None)
        return SamplerOutput(token_ids, logprobs)

    @staticmethod
    def _log_failure(request: Request, what: str, e: Exception) -> str:
        logger.exception("request %s failed while %s; the others go on", request.request_id, what)
        return f"the engine failed while {what}: {type(e).__name__}: {e}"

    def _fail(self, request: Request, error: str) -> None:
        """End every live sample of a request with finish_reason "error"."""
        for seq in request.live_seqs:
            seq.finish_reason = "error"
            seq.emitted_len = len(seq.text)

    def _speculate(self, sched: SchedulerOutput,
                   seqs: list[request.Sequence]) -> Callable[[torch.Tensor], None] | None:
        """With overlap_decode: a hook for the sampler that queues the next decode of every sequence that
        got a token this step (decodes, and prompts that ended: their forks are copied by then) on the
        device from the tokens just sampled, before the host reads them. The next step takes its rows for
        the decodes it schedules (every running sequence that did not finish; a sequence that finished
        leaves a step in its freed slot, which is zeroed on reuse) and runs only prompt chunks, so a
        mixed step keeps its decodes at graph speed too. This relies on every decoding sequence decoding
        in every step (max_num_batched_tokens >= max_num_seqs, checked at start-up): a sequence left out
        of this step would run later with its token absorbed twice. Not when every sequence is at its
        max_tokens."""
        if (not self.config.use_overlap_decode
                or all(len(s.token_ids) + 1 >= s.request.max_tokens for s in seqs)):
            return None

        ids, slots = [s.seq_id for s in seqs], [s.slot for s in seqs]

        def queue_next(token_ids: torch.Tensor) -> None:
            self._speculated = (ids, self.runner.decode_next(token_ids, slots))
        return queue_next

    def _fed_last(self) -> frozenset[int]:
        """Ids of the sequences whose last token the decode queued ahead has absorbed (overlap_decode)."""
        return frozenset(self._speculated[0]) if self._speculated is not None else frozenset()

    def _finished_stats(self, request: Request, now: float, reason: str | None) -> FinishedRequestStats:
        reasons = [s.finish_reason for s in request.seqs if s.finish_reason]
        return FinishedRequestStats(
            finish_reason=reason or (reasons[0] if reasons else "abort"),
            e2e_latency=now - request.arrival_time,
            queue_time=(request.scheduled_time or now) - request.arrival_time,
            num_prompt_tokens=request.num_prompt_tokens,
            num_generation_tokens=sum(len(s.token_ids) for s in request.seqs))

    def _emit(self, stats: EngineStats) -> None:
        stats.num_running = self.scheduler.num_running
        stats.num_waiting = self.scheduler.num_waiting
        stats.slots_used = self.pool.allocator.num_used
        stats.slots_total = self.pool.num_slots
        stats.state_memory_bytes = self.pool.nbytes
        if self.prefix_cache is not None:
            stats.prefix_cache = self.prefix_cache.take_stats()
        for fn in self.stats_listeners:
            try:
                fn(stats)
            except Exception:  # a broken listener must not stop the engine
                logger.exception("stats listener failed")

    def default_sampling_params(self) -> SamplingParams:
        """SamplingParams() with the model's generation_config.json defaults, where it has any."""
        try:
            from .loader import load_generation_config

            gen = load_generation_config(self.config.model) or {}
        except (ImportError, OSError, ValueError):
            gen = {}
        keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        return SamplingParams(**{k: gen[k] for k in keys if k in gen})

