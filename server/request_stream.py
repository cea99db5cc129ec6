"""The engine iterators behind one HTTP request (one per prompt), drained by their own tasks into one
holder of the newest output per prompt.

Each engine iterator lives in a plain asyncio task, so a client that goes away cancels that task: the
cancellation reaches the engine's generator, which aborts the request and frees its state slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from starlette.requests import Request

from ..engine.errors import EngineDeadError
from ..engine.output_holder import OutputHolder
from ..engine.outputs import RequestOutput
from ..engine.sampling_params import SamplingParams
from ..engine.stats import EngineStats

T = TypeVar("T")


class EngineClient(Protocol):
    """What the server needs of engine.async_llm.AsyncLLM (docs/internals.md, "engine → server")."""

    tokenizer: Any  # engine.tokenizer.Tokenizer
    model_config: Any  # engine.model_config.ModelConfig
    config: Any  # engine.config.EngineConfig
    grammars: Any  # engine.grammar.GrammarCompiler, or None: no structured outputs
    served_model_name: str
    is_running: bool  # the step loop is alive

    async def start(self) -> None: ...

    async def shutdown(self, drain: bool = True) -> None: ...

    def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def add_stats_listener(self, fn: Callable[[EngineStats], None]) -> None: ...


class RequestStream:
    """Outputs of several engine requests as one stream of (prompt index, cumulative RequestOutput).

    Each prompt's newest snapshot waits in an OutputHolder until the response takes it: a reader that
    falls behind (a full socket buffer) gets the snapshots merged, and the stream holds at most one
    snapshot per prompt beside the one being written, whatever the reader does.
    """

    def __init__(
        self, engine: EngineClient, prompts: list[str | list[int]], params: SamplingParams, request_id: str
    ) -> None:
        self.num_prompts = len(prompts)
        self._holder: OutputHolder[RequestOutput] = OutputHolder()
        self._taken: dict[int, RequestOutput | BaseException] = {}  # taken by prefetch, not yet yielded
        self._open = set(range(len(prompts)))  # prompts whose last output has not been yielded
        self._tasks = [
            asyncio.create_task(self._drain(i, engine, p, params, f"{request_id}-{i}"))
            for i, p in enumerate(prompts)
        ]

    async def _drain(
        self,
        index: int,
        engine: EngineClient,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str,
    ) -> None:
        iterator: AsyncIterator[RequestOutput] | None = None
        finished = False
        try:
            iterator = engine.generate(prompt, params, request_id=request_id)
            async for output in iterator:
                self._holder.put(index, output)
                finished = output.finished
            if not finished:
                self._holder.put(index, EngineDeadError("the engine ended the request without finishing it"))
        except Exception as exc:  # delivered to the consumer, which maps it to an HTTP error
            self._holder.put(index, exc)
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()

    def fail(self, exc: BaseException) -> None:
        """End the stream with `exc` at the reader's next take (shutdown)."""
        self._holder.put(-1, exc)

    async def _take(self) -> dict[int, RequestOutput | BaseException]:
        if self._taken:
            taken, self._taken = self._taken, {}
            return taken
        return await self._holder.take()

    async def prefetch(self) -> None:
        """Wait until every prompt has its first output (errors raised before any byte is sent)."""
        while len(self._taken) < self.num_prompts:
            for index, item in (await self._holder.take()).items():
                if isinstance(item, BaseException):
                    raise item
                self._taken[index] = item

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._open:
            for index, item in (await self._take()).items():
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self._open.discard(index)
                yield index, item

    async def final_outputs(self) -> list[RequestOutput]:
        """Drain to the end; the last output of each prompt, in prompt order."""
        last: dict[int, RequestOutput] = {}
        async for index, output in self:
            last[index] = output
        return [last[i] for i in range(self.num_prompts)]

    async def aclose(self) -> None:
        """Abort whatever is still running; safe to call from a cancelled task."""
        pending = [t for t in self._tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> tuple[bool, T | None]:
    """Run `work` while watching the connection: (True, result), or (False, None) once the client is gone."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return False, None
    return True, task.result()
