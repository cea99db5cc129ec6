"""AsyncEngineClient: AsyncLLM's interface over the engine-core process, for the API server processes.

Requests are validated and tokenized here (text in a worker thread), sent to the core as token ids and
SamplingParams, and come back as token ids per step (engine/core_proc.py), which OutputTracker turns into
text, stop strings and wake-ups for the readers (engine/output_tracker.py). Inputs are batched: all that
is posted in one event-loop turn goes out as one message; all that arrived meanwhile is read at once.

If the core process exits (watched through a pidfd, so a kill -9 shows at once) or reports its own
failure, every stream ends with EngineDeadError and the death listeners are told (the server exits 1).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping

import msgspec
import zmq
import zmq.asyncio

from .errors import EngineDeadError, InvalidRequestError
from .grammar import compiler_for
from .input_processor import InputProcessor
from .messages import AddRequest, ClientInputs, EngineInfo, Hello, StepOutputs, client_identity
from .output_processor import make_output
from .output_tracker import OutputTracker
from .outputs import RequestOutput
from .sampling_params import SamplingParams
from .stats import EngineStats
from .tokenizer import Tokenizer

logger = logging.getLogger(__name__)

PID_POLL_S = 0.5  # where pidfds are missing, how often a watched process is looked for
POLLIN = int(zmq.POLLIN)  # a plain int: pyzmq's flag enums cost microseconds per operation
_clients = itertools.count()  # clients made in this process: each has a socket identity of its own


class AsyncEngineClient:
    def __init__(self, info: EngineInfo, address: str, tokenizer: Tokenizer, *, stream_interval: int = 1,
                 watch: Mapping[int, str] | None = None) -> None:
        self.info = info
        self.config = info  # what the server reads of its engine: max_model_len, max_waiting, max_num_seqs
        self.model_config = info  # vocab_size, max_model_len
        self.tokenizer = tokenizer
        self.served_model_name = info.served_model_name
        self.address = address
        self.watch = dict(watch or {})  # pid -> what it is (the core, the launcher): if it exits, all ends
        # the server compiles grammars in worker threads (a 400 for one that cannot compile), before the core
        self.grammars = compiler_for(tokenizer, info.vocab_size, sorted(info.eos_token_ids))
        self.inputs = InputProcessor(tokenizer, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                                     max_num_seqs=info.max_num_seqs, eos_token_ids=info.eos_token_ids,
                                     grammars=self.grammars)
        self.outputs = OutputTracker(tokenizer, stream_interval)
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._death_listeners: list[Callable[[BaseException], None]] = []
        self._abort_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._inputs = ClientInputs()  # posted this event-loop turn, sent together
        self._flush_scheduled = False
        self._context: zmq.asyncio.Context | None = None
        self._socket: zmq.asyncio.Socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._watch_fds: list[int] = []
        self._watch_tasks: list[asyncio.Task[None]] = []
        self._idle: asyncio.Event | None = None
        self._accepting = False
        self._dead: BaseException | None = None
        self._encode = msgspec.msgpack.Encoder().encode

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._context = zmq.asyncio.Context()
        sock = self._context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, client_identity(os.getpid(), next(_clients)))
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        self._socket = sock
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = True
        self._send(Hello())
        self._task = asyncio.create_task(self._receive(), name="fenwick-core-client")
        for pid, what in self.watch.items():
            self._watch_process(pid, what)

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting; let this server's requests finish (drain) or abort them; disconnect. The core
        and the other API servers go on."""
        self._accepting = False
        if self._task is None:
            return
        if not drain:
            for request_id in list(self.outputs.requests):
                self._post_abort(request_id)
        while self.outputs.requests and self._dead is None:
            assert self._idle is not None
            self._idle.clear()
            await self._idle.wait()
        self._flush()
        task = self._task
        self._close()
        if task is not asyncio.current_task():
            await asyncio.gather(task, return_exceptions=True)

    def _close(self) -> None:
        loop = asyncio.get_running_loop()
        for fd in self._watch_fds:
            loop.remove_reader(fd)
            os.close(fd)
        self._watch_fds.clear()
        for task in self._watch_tasks:
            task.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self._task = None
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
        if self._context is not None:
            self._context.term()
            self._context = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and self._dead is None

    def add_stats_listener(self, fn: Callable[[EngineStats], None]) -> None:
        """fn(stats) after every engine step, if the core sends this API server the stats (the first)."""
        self._listeners.append(fn)

    def add_death_listener(self, fn: Callable[[BaseException], None]) -> None:
        """fn(error) runs on the event loop once, if the engine core fails or its process exits."""
        self._death_listeners.append(fn)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutput snapshots; the last has finished=True. Errors come before the first.

        Closing the iterator early (or cancelling its consumer) aborts the request and frees its slots.
        """
        self._check_open(request_id)
        if isinstance(prompt, str):
            request = await asyncio.to_thread(self.inputs.make_request, request_id, prompt, params)
        else:  # token ids: checked at once (at most max_model_len of them), no thread hop
            request = self.inputs.make_request(request_id, prompt, params)
        self._check_open(request_id)
        tracked = self.outputs.add(request)
        assert self._idle is not None
        self._idle.clear()
        self._inputs.adds.append(AddRequest(request_id, request.prompt_token_ids, params, request.max_tokens,
                                            request.arrival_time))
        self._schedule_flush()
        finished = False
        try:
            while True:
                item = (await tracked.holder.take())[0]
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                out = make_output(request)  # built when taken: the news of every step since the last take
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self.outputs.remove(request_id)
            if not finished:
                self._post_abort(request_id)
            if not self.outputs.requests:
                self._idle.set()

    def _check_open(self, request_id: str) -> None:
        if self._dead is not None or self._task is None or not self._accepting:
            raise EngineDeadError("the engine is not running" if self._dead is None else str(self._dead))
        if request_id in self.outputs.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running")

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once the core has freed its slots (its stream ends with "abort")."""
        if self._task is None or self._dead is not None:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._abort_waiters.setdefault(request_id, []).append(waiter)
        self._post_abort(request_id)
        await waiter

    # ---- to the core ---------------------------------------------------------------------------
    def _post_abort(self, request_id: str) -> None:
        self._inputs.aborts.append(request_id)
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        inputs, self._inputs = self._inputs, ClientInputs()
        if inputs.adds or inputs.aborts or inputs.stops:
            self._send(inputs)

    def _send(self, message: ClientInputs | Hello) -> None:
        if self._socket is not None and self._dead is None:
            self._socket.send(self._encode(message))  # never waits: no high-water mark

    # ---- from the core -------------------------------------------------------------------------
    async def _receive(self) -> None:
        assert self._socket is not None
        decode = msgspec.msgpack.Decoder(StepOutputs).decode
        drain = zmq.Socket.shadow(self._socket.underlying)
        try:
            while True:
                batch = [await self._socket.recv()]
                while drain.get(zmq.EVENTS) & POLLIN:  # all that came meanwhile: a busy server merges steps
                    batch.append(drain.recv())
                for payload in batch:
                    self._apply(decode(payload))
                self.outputs.wake_readers()
                if self._dead is not None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a message we cannot read, or a bug here: this server cannot go on
            logger.exception("reading the engine core's outputs failed")
            self._die(EngineDeadError(f"reading the engine core's outputs failed: {e!r}"))

    def _apply(self, message: StepOutputs) -> None:
        for delta in message.requests:
            stops = self.outputs.apply(delta)
            if stops:
                self._inputs.stops.extend(stops)
                self._schedule_flush()
            if delta.finished:
                for waiter in self._abort_waiters.pop(delta.request_id, []):
                    if not waiter.done():
                        waiter.set_result(None)
        for stats in message.stats:
            for fn in self._listeners:
                try:
                    fn(stats)
                except Exception:
                    logger.exception("stats listener failed")
        if message.dead is not None:
            self._die(EngineDeadError(f"the engine loop failed: {message.dead}"))

    # ---- the core's health ---------------------------------------------------------------------
    def _watch_process(self, pid: int, what: str) -> None:
        loop = asyncio.get_running_loop()
        try:
            fd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # no pidfds (not Linux 5.3+): look for the process now and then
            fd = -1

        def gone() -> None:
            if fd >= 0:
                loop.remove_reader(fd)  # readable for good once the process has exited
            self._die(EngineDeadError(f"{what} (pid {pid}) has exited"))

        if fd < 0:
            self._watch_tasks.append(asyncio.create_task(_poll_process(pid, gone)))
            return
        self._watch_fds.append(fd)
        loop.add_reader(fd, gone)

    def _die(self, error: BaseException) -> None:
        if self._dead is not None:
            return
        logger.error("the engine is gone: %s", error)
        self._dead = error
        self._accepting = False
        self.outputs.fail_all(EngineDeadError(str(error)))
        for waiters in self._abort_waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        self._abort_waiters.clear()
        if self._idle is not None:
            self._idle.set()
        for fn in self._death_listeners:
            try:
                fn(error)
            except Exception:
                logger.exception("death listener failed")


async def _poll_process(pid: int, gone: Callable[[], None]) -> None:
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            gone()
            return
        except PermissionError:
            pass
        await asyncio.sleep(PID_POLL_S)
