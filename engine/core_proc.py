"""The engine core in its own process: a step loop that never waits on HTTP.

Each turn takes every input waiting on the socket (blocking only while there is no work), applies them
to the EngineCore (new requests, aborts, stops), runs one step and sends each API server one StepOutputs
holding, per request of its own, the token ids sampled since the last message. The core does not
detokenize (EngineCore(detokenize=False)): text and stop strings are the API servers' work; a stop string
they find comes back as a stop a step or two later, and they drop the tokens past it.

A constrained request whose grammar the core has not compiled yet waits in `compiling` while a worker
thread compiles it (llguidance releases the GIL while it builds), so the running requests' steps go on;
it joins the engine once its grammar is ready.

If a step raises, every API server is told (StepOutputs.dead) and the process exits 1; the API servers
also watch this process, so a kill -9 reaches them too. Messages: engine/messages.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import msgspec
import zmq

from .config import EngineConfig
from .engine_core import EngineCore
from .errors import EngineError, QueueFullError
from .messages import (
    AddRequest,
    ClientGone,
    ClientInputs,
    CoreInput,
    EngineInfo,
    Hello,
    RequestDelta,
    SampleDelta,
    Shutdown,
    StepOutputs,
    is_client_of,
)
from .outputs import RequestOutput
from .request import Request, RequestStatus
from .startup import configure_logging, freeze_heap, set_cpu_threads
from .stats import EngineStats

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 500  # while idle, how often the loop looks up from the socket to see whether its parent lives
COMPILE_POLL_MS = 1  # while idle but for grammars compiling, how often the loop looks at them
POLLIN = int(zmq.POLLIN)  # a plain int: pyzmq's flag enums cost microseconds per operation


@dataclass
class _Owned:
    """A running request's API server and what it has been sent of each sample."""

    identity: bytes  # the API server's socket identity
    sent: list[int]  # per sample: token ids sent
    ended: list[bool] = field(default_factory=list)  # per sample: its finish reason was sent

    def delta(self, sample: Any) -> SampleDelta | None:
        """News of one sample (a request.Sequence or an outputs.CompletionOutput), or None."""
        i, n = sample.index, len(sample.token_ids)
        sent, ended = self.sent[i], sample.finish_reason is not None
        if n == sent and (not ended or self.ended[i]):
            return None
        self.sent[i], self.ended[i] = n, ended
        logprobs = sample.logprobs[sent:] if sample.logprobs is not None else None
        return SampleDelta(i, sample.token_ids[sent:], logprobs, sample.finish_reason, sample.stop_reason)


class EngineCoreProc:
    def __init__(self, core: EngineCore, address: str, parent_pid: int | None = None) -> None:
        self.core = core
        self.parent_pid = parent_pid  # the loop ends if this process is no longer its parent
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.SNDHWM, 0)  # never drop a step's tokens for a busy API server
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.poller = zmq.Poller()
        self.poller.register(self.socket, zmq.POLLIN)
        self.owners: dict[str, _Owned] = {}  # running request id -> its API server and what it was sent
        self.clients: list[bytes] = []  # API servers that said Hello, in order; stats go to the first
        self.outbox: dict[bytes, list[RequestDelta]] = {}  # this turn's news, by API server
        self.stats: list[EngineStats] = []
        core.add_stats_listener(self.stats.append)
        # request id -> (its API server, the request, its grammar's compile in the worker)
        self.compiling: dict[str, tuple[bytes, AddRequest, Future[Any]]] = {}
        self._compiler = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self.stopping = False
        self._decode = msgspec.msgpack.Decoder(CoreInput).decode
        self._encode = msgspec.msgpack.Encoder().encode

    def info(self) -> EngineInfo:
        c = self.core
        return EngineInfo(model=str(c.config.model), served_model_name=str(c.config.served_model_name),
                          max_model_len=c.inputs.max_model_len, vocab_size=c.model_config.vocab_size,
                          max_num_seqs=c.inputs.max_num_seqs, max_waiting=c.config.max_waiting,
                          eos_token_ids=c.inputs.eos_token_ids)

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """Until Shutdown (or the parent's death): inputs, one step, outputs."""
        while not self.stopping:
            idle = not self.core.has_unfinished()
            if idle and self.compiling:
                self.poller.poll(COMPILE_POLL_MS)
            got = self._receive(block=idle and not self.compiling)
            got = self._admit_compiled() or got
            if got or self.core.has_unfinished():  # an abort alone still steps, so the stats show it
                self._collect(self.core.step(stream=False))
            self._send()

    def close(self, dead: str | None = None) -> None:
        """Tell the API servers why the core stops (dead), if it fails; close the socket."""
        if dead is not None:
            payload = self._encode(StepOutputs([], dead=dead))
            for identity in self.clients:
                self.socket.send_multipart([identity, payload])
        self.socket.close(linger=1000 if dead is not None else 0)
        self.context.term()
        self._compiler.shutdown(wait=False, cancel_futures=True)

    def _receive(self, block: bool) -> bool:
        while block and not self.stopping and not self.poller.poll(IDLE_POLL_MS):
            self._check_parent()
        got = False
        while self.socket.get(zmq.EVENTS) & POLLIN:  # no exception when there is nothing: most steps
            try:
                identity, payload = self.socket.recv_multipart()
            except ValueError:  # not [identity, payload]: not one of ours
                continue
            try:
                message = self._decode(payload)
            except msgspec.DecodeError:
                logger.error("dropped a message the core cannot read from %r", identity)
                continue
            self._handle(identity, message)
            got = True
        self._check_parent()
        return got

    def _check_parent(self) -> None:
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.error("the launcher (pid %d) is gone: the engine core stops", self.parent_pid)
            self._abort_all(lambda _: True)
            self.stopping = True

    def _handle(self, identity: bytes, message: Any) -> None:
        if isinstance(message, ClientInputs):
            for add in message.adds:
                self._add(identity, add)
            for request_id in message.aborts:
                if self.compiling.pop(request_id, None) is not None:  # not in the engine yet, nor ever
                    self._queue(identity, RequestDelta(request_id, [], finished=True))
                    continue
                out = self.core.abort(request_id)
                if out is not None:
                    self._final(out)
                else:  # unknown or finished already: the API server still learns it is over
                    self._queue(identity, RequestDelta(request_id, [], finished=True))
            for request_id, index in message.stops:
                out = self.core.finish_sample(request_id, index)
                if out is not None:
                    self._final(out)
        elif isinstance(message, Hello):
            if identity not in self.clients:
                self.clients.append(identity)
        elif isinstance(message, ClientGone):
            gone = sum(is_client_of(owned.identity, message.pid) for owned in self.owners.values())
            if gone:
                logger.warning("API server %d is gone: aborting its %d requests", message.pid, gone)
            self._abort_all(lambda owner: is_client_of(owner, message.pid))
            self.clients = [c for c in self.clients if not is_client_of(c, message.pid)]
            for identity in [i for i in self.outbox if is_client_of(i, message.pid)]:
                del self.outbox[identity]
        elif isinstance(message, Shutdown):
            self._abort_all(lambda _: True)
            self.stopping = True

    def _add(self, identity: bytes, add: AddRequest) -> None:
        spec, grammars = add.params.structured_outputs, self.core.grammars
        if spec is not None and grammars is not None and not grammars.is_cached(spec):
            self.compiling[add.request_id] = (identity, add, self._compiler.submit(grammars.get, spec))
            return
        self._admit(identity, add)

    def _admit_compiled(self) -> bool:
        """Requests whose grammar is ready join the engine (a compile error is the request's); whether any
        did."""
        ready = [rid for rid, (_, _, compile_) in self.compiling.items() if compile_.done()]
        for request_id in ready:
            identity, add, compile_ = self.compiling.pop(request_id)
            error = compile_.exception()
            if error is None:
                self._admit(identity, add)
            else:  # the API server compiled it already, so this is unexpected; still the request's alone
                self._queue(identity, RequestDelta(request_id, [], finished=True, error=str(error),
                                                   rejected="invalid"))
        return bool(ready)

    def _admit(self, identity: bytes, add: AddRequest) -> None:
        ids, vocab = add.prompt_token_ids, self.core.model_config.vocab_size
        try:
            if not ids or min(ids) < 0 or max(ids) >= vocab:  # an embedding out of range would kill the step
                raise EngineError(f"prompt token ids must be in [0, {vocab})")
            request = Request(add.request_id, None, ids, add.params, max_tokens=add.max_tokens,
                              eos_token_ids=self.core.inputs.eos_token_ids, arrival_time=add.arrival_time)
            self.core.add_request(request)
        except Exception as e:
            if not isinstance(e, EngineError):
                logger.exception("adding request %s failed", add.request_id)
            kind = "queue_full" if isinstance(e, QueueFullError) else "invalid"
            rejected = RequestDelta(add.request_id, [], finished=True, error=str(e), rejected=kind)
            self._queue(identity, rejected)
            return
        self.owners[add.request_id] = _Owned(identity, [0] * add.params.n, [False] * add.params.n)

    def _abort_all(self, whose: Callable[[bytes], bool]) -> None:
        for request_id, (identity, _, _) in list(self.compiling.items()):
            if whose(identity):
                del self.compiling[request_id]
                self._queue(identity, RequestDelta(request_id, [], finished=True))
        for request_id, owned in list(self.owners.items()):
            if whose(owned.identity):
                out = self.core.abort(request_id)
                if out is not None:
                    self._final(out)

    # ---- outputs -------------------------------------------------------------------------------
    def _collect(self, finished: list[RequestOutput]) -> None:
        """This step's news: the finished requests' last tokens, then every decoding request's new ones."""
        for out in finished:
            self._final(out)
        for request_id, request in self.core.requests.items():
            owned = self.owners.get(request_id)
            if owned is None or request.status is not RequestStatus.DECODE:
                continue
            samples = [d for s in request.seqs if (d := owned.delta(s)) is not None]
            if samples:
                self._queue(owned.identity, RequestDelta(request_id, samples,
                                                         num_cached_tokens=request.num_cached_tokens))

    def _final(self, out: RequestOutput) -> None:
        owned = self.owners.pop(out.request_id, None)
        if owned is None:
            return
        samples = [d for c in out.outputs if (d := owned.delta(c)) is not None]
        self._queue(owned.identity, RequestDelta(out.request_id, samples, finished=True, error=out.error,
                                                 num_cached_tokens=out.num_cached_tokens))

    def _queue(self, identity: bytes, delta: RequestDelta) -> None:
        self.outbox.setdefault(identity, []).append(delta)

    def _send(self) -> None:
        stats, self.stats[:] = list(self.stats), []
        first = self.clients[0] if self.clients else None
        if stats and first is not None:
            self.outbox.setdefault(first, [])
        for identity, deltas in self.outbox.items():
            message = StepOutputs(deltas, stats if identity == first else [])
            self.socket.send_multipart([identity, self._encode(message)])
        self.outbox.clear()


def run_engine_core(config: EngineConfig, address: str, ready: Connection, log_level: str) -> None:
    """The engine-core process (spawned by server/launcher.py): load the model, allocate the pool and
    capture the graphs, bind the socket, report EngineInfo (or the error) on `ready`, then loop until the
    launcher says Shutdown. SIGINT / SIGTERM are the launcher's to handle: it drains the API servers first."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level)
    try:
        threads = set_cpu_threads(config.cpu_threads)
        proc = EngineCoreProc(EngineCore(config, detokenize=False), address, parent_pid=os.getppid())
        freeze_heap()  # the loaded model and engine out of the garbage collector's sight
    except BaseException as e:
        logger.exception("the engine core failed to start")
        ready.send(("error", f"{type(e).__name__}: {e}"))
        sys.exit(1)
    ready.send(("ready", proc.info()))
    ready.close()
    logger.info("engine core ready: %d slots, cpu threads %d, listening on %s", proc.info().max_num_seqs,
                threads, address)
    try:
        proc.run()
    except Exception as e:
        logger.exception("the engine core's loop failed")
        proc.close(dead=f"{type(e).__name__}: {e}")
        sys.exit(1)
    proc.close()
