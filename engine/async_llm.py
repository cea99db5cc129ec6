"""AsyncLLM: the online engine behind the server. One background step loop, one asyncio queue per request.

The EngineCore is single-threaded and runs its steps in a worker thread (so the event loop keeps serving
HTTP while the model runs). The event loop never touches the core's scheduler directly: adds and aborts
go through an inbox that the worker drains at the start of each step; outputs and stats come back to
the event loop, which fills the per-request holders (the newest snapshot each: bounded whatever the reader
does) and calls the stats listeners. Tokenizing a prompt costs time in its length, so it runs in a worker
thread too. One request's failure ends only that request; if the loop itself fails, every stream ends
with EngineDeadError and the death listeners are told (the server then exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .config import EngineConfig
from .engine_core import EngineCore
from .errors import EngineDeadError, EngineError, InvalidRequestError, QueueFullError, RequestFailedError
from .output_holder import OutputHolder
from .outputs import RequestOutput
from .request import Request
from .sampling_params import SamplingParams
from .stats import EngineStats

logger = logging.getLogger(__name__)

Item = RequestOutput | BaseException


class AsyncLLM:
    def __init__(self, config: EngineConfig, model: Any = None, tokenizer: Any = None) -> None:
        self.config = config
        self.core = EngineCore(config, model, tokenizer)
        self.tokenizer = self.core.tokenizer
        self.model_config = self.core.model_config
        self.grammars = self.core.grammars  # thread-safe: the server compiles in worker threads
        self.served_model_name = str(config.served_model_name)
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._death_listeners: list[Callable[[BaseException], None]] = []
        self._step_stats: list[EngineStats] = []  # filled by the core in the worker, emitted on the loop
        self.core.add_stats_listener(self._step_stats.append)
        self._queues: dict[str, OutputHolder[RequestOutput]] = {}  # newest output of each running request
        self._inbox: list[tuple[str, Request | str]] = []  # ("add", request) | ("abort", request_id)
        self._inbox_lock = threading.Lock()
        self._abort_waiters: list[tuple[str, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._accepting = False
        self._stopping = False
        self._dead: BaseException | None = None

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._task is not None:
            return
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._accepting, self._stopping = True, False
        self._task = asyncio.create_task(self._loop(), name="fenwick-engine-loop")

    async def shutdown(self, drain: bool = True) -> None:
        """Stop accepting; finish (drain) or abort the running requests; stop the loop."""
        self._accepting = False
        if self._task is None:
            return
        if not drain:
            for request_id in list(self._queues):
                self._post("abort", request_id)
        while self._dead is None and (self._inbox or self.core.has_unfinished()):
            assert self._idle is not None
            self._idle.clear()
            await self._idle.wait()
        self._stopping = True
        self._signal()
        await self._task
        self._task = None

    @property
    def is_running(self) -> bool:
        return self._task is not None and self._dead is None

    def add_stats_listener(self, fn: Callable[[EngineStats], None]) -> None:
        self._listeners.append(fn)

    def add_death_listener(self, fn: Callable[[BaseException], None]) -> None:
        """fn(error) runs on the event loop once, if the step loop fails for good."""
        self._death_listeners.append(fn)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Cumulative RequestOutput snapshots; the last has finished=True. Errors come before the first.

        Closing the iterator early (or cancelling its consumer) aborts the request and frees its slots.
        """
        if self._dead is not None or self._task is None or not self._accepting:
            raise EngineDeadError("the engine is not running" if self._dead is None else
                                  f"the engine loop has stopped: {self._dead!r}")
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self._check_room()  # before tokenizing: a full queue costs the caller nothing
        request = await asyncio.to_thread(self.core.make_request, request_id, prompt, params)
        if request_id in self._queues:
            raise InvalidRequestError(f"request id {request_id!r} is already running")
        self._check_room()
        holder: OutputHolder[RequestOutput] = OutputHolder()
        self._queues[request_id] = holder
        self._post("add", request)
        finished = False
        try:
            while True:
                item = (await holder.take())[0]  # the newest snapshot: it carries the ones it replaced
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                self._post("abort", request_id)

    def _check_room(self) -> None:
        """QueueFullError unless the request can wait: beyond the free slots, max_waiting may wait."""
        if self._dead is not None or not self._accepting:
            raise EngineDeadError("the engine is not running")
        pending = sum(1 for kind, _ in self._inbox if kind == "add")
        free = self.core.scheduler.slots.num_free
        if self.core.scheduler.num_waiting + pending >= self.config.max_waiting + free:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")

    async def abort(self, request_id: str) -> None:
        """Abort a request; returns once its slots are free (its stream ends with finish_reason "abort")."""
        if self._task is None or self._dead is not None:
            out = self.core.abort(request_id)
            if out is not None:
                self._deliver(out)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._abort_waiters.append((request_id, fut))
        self._post("abort", request_id)
        await fut

    # ---- the loop ------------------------------------------------------------------------------
    def _post(self, kind: str, payload: Request | str) -> None:
        with self._inbox_lock:
            self._inbox.append((kind, payload))
        self._signal()

    def _signal(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _deliver(self, item: Item, request_id: str | None = None) -> None:
        rid = request_id if request_id is not None else item.request_id  # type: ignore[union-attr]
        holder = self._queues.get(rid)
        if holder is None:
            return
        if isinstance(item, RequestOutput) and item.error is not None:
            item = RequestFailedError(item.error)
        holder.put(0, item)

    def _work(self) -> tuple[list[RequestOutput], list[tuple[str, EngineError]], set[str]]:
        """Runs in the worker thread: apply the inbox, then one step if there is anything to do."""
        with self._inbox_lock:
            inbox, self._inbox = self._inbox, []
        outputs: list[RequestOutput] = []
        rejected: list[tuple[str, EngineError]] = []
        aborted: set[str] = set()
        for kind, payload in inbox:
            if kind == "add":
                assert isinstance(payload, Request)
                try:
                    self.core.add_request(payload)
                except EngineError as e:
                    rejected.append((payload.request_id, e))
                except Exception as e:  # a bug in adding one request: only that request fails
                    logger.exception("adding request %s failed", payload.request_id)
                    error = RequestFailedError(f"adding the request failed: {e!r}")
                    rejected.append((payload.request_id, error))
            else:
                assert isinstance(payload, str)
                aborted.add(payload)
                try:
                    out = self.core.abort(payload)
                except Exception:
                    logger.exception("aborting request %s failed", payload)
                    continue
                if out is not None:
                    outputs.append(out)
        if inbox or self.core.has_unfinished():
            outputs.extend(self.core.step())
        return outputs, rejected, aborted

    async def _loop(self) -> None:
        assert self._wake is not None and self._idle is not None
        try:
            while True:
                if not self._inbox and not self.core.has_unfinished():
                    self._idle.set()
                    if self._stopping:
                        return
                    await self._wake.wait()
                    self._wake.clear()
                    continue
                outputs, rejected, aborted = await asyncio.to_thread(self._work)
                for out in outputs:
                    self._deliver(out)
                for request_id, error in rejected:
                    self._deliver(error, request_id)
                stats, self._step_stats[:] = list(self._step_stats), []
                for s in stats:
                    for fn in self._listeners:
                        try:
                            fn(s)
                        except Exception:
                            logger.exception("stats listener failed")
                for request_id, fut in [w for w in self._abort_waiters if w[0] in aborted]:
                    self._abort_waiters.remove((request_id, fut))
                    if not fut.done():
                        fut.set_result(None)
        except Exception as e:
            logger.exception("engine loop failed")
            self._dead = e
            for request_id in list(self._queues):
                self._deliver(EngineDeadError(f"the engine loop failed: {e!r}"), request_id)
            for _, fut in self._abort_waiters:
                if not fut.done():
                    fut.set_result(None)
            self._idle.set()
            for fn in self._death_listeners:
                try:
                    fn(e)
                except Exception:
                    logger.exception("death listener failed")
