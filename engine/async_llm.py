"""AsyncLLM: the online engine behind the server. One background step loop, one asyncio queue per request.

The EngineCore is single-threaded and runs its steps in a worker thread (so the event loop keeps serving
HTTP while the model runs). The event loop never touches the core's scheduler directly: adds and aborts
go through an inbox that the worker drains at the start of each step; outputs and stats come back to
the event loop, which fills the per-request queues and calls the stats listeners.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from .config import EngineConfig
from .engine_core import EngineCore
from .errors import EngineDeadError, EngineError, InvalidRequestError, QueueFullError
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
        self.served_model_name = str(config.served_model_name)
        self._listeners: list[Callable[[EngineStats], None]] = []
        self._step_stats: list[EngineStats] = []  # filled by the core in the worker, emitted on the loop
        self.core.add_stats_listener(self._step_stats.append)
        self._queues: dict[str, asyncio.Queue[Item]] = {}
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
        request = self.core.make_request(request_id, prompt, params)
        pending = sum(1 for kind, _ in self._inbox if kind == "add")
        if self.core.scheduler.num_waiting + pending >= self.config.max_waiting:
            raise QueueFullError(f"the waiting queue is full ({self.config.max_waiting} requests)")
        queue: asyncio.Queue[Item] = asyncio.Queue()
        self._queues[request_id] = queue
        self._post("add", request)
        finished = False
        try:
            while True:
                item = await queue.get()
                while not queue.empty():  # snapshots are cumulative: a slow reader only needs the latest
                    item = queue.get_nowait()
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
        queue = self._queues.get(rid)
        if queue is not None:
            queue.put_nowait(item)

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
            else:
                assert isinstance(payload, str)
                out = self.core.abort(payload)
                aborted.add(payload)
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
