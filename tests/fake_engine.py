"""A fake engine for in-process server apps, and the fixtures that serve one over ASGI.

Loaded as a pytest plugin by tests/conftest.py, so `engine_client` and `client` reach every test module;
a module that defines its own `client` (a real server's) overrides this one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fenwick_llm.engine.errors import EngineDeadError, PromptTooLongError, QueueFullError
from fenwick_llm.engine.outputs import CompletionOutput, Logprob, RequestOutput, TokenLogprobs
from fenwick_llm.engine.sampling_params import SamplingParams
from fenwick_llm.engine.stats import EngineStats, FinishedRequestStats
from fenwick_llm.server.app import create_app
from fenwick_llm.server.config import ServerConfig


class FakeTokenizer:
    """One token per character: id = ord(c) - 29 for printable ASCII; 0 pad, 1 BOS, 2 EOS."""

    vocab_size = 100
    bos_token_id = 1
    eos_token_id = 2
    all_special_ids = [0, 1, 2]
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [min(max(ord(c) - 29, 3), 99) for c in text]
        return ([self.bos_token_id] if add_special_tokens else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i + 29) for i in ids if i > 2 or not skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        return chr(i + 29)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")


class FakeEngine:
    """The AsyncLLM interface over a deterministic "model": token t+1 = (t * 7 + 3) mod 97 + 3."""

    def __init__(self, max_num_seqs: int = 4, max_waiting: int = 64, step_s: float = 0.002) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = SimpleNamespace(vocab_size=100, max_model_len=256)
        self.config = SimpleNamespace(model="/models/fake", max_model_len=None, max_num_seqs=max_num_seqs)
        self.served_model_name = "fake"
        self.grammars = None  # no grammar engine: constrained requests get 400
        self.max_waiting = max_waiting
        self.step_s = step_s
        self.slots = asyncio.Semaphore(max_num_seqs)
        self.slots_used = 0
        self.waiting = 0
        self.aborted: list[str] = []
        self.listeners: list[Callable[[EngineStats], None]] = []
        self.started = False
        self.stopped = False
        self.die_after: int | None = None  # raise EngineDeadError after this many tokens

    @property
    def is_running(self) -> bool:
        return self.started and not self.stopped

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, drain: bool = True) -> None:
        self.stopped = True

    def add_stats_listener(self, fn: Callable[[EngineStats], None]) -> None:
        self.listeners.append(fn)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def _emit(self, **kw: Any) -> None:
        stats = EngineStats(
            num_running=self.slots_used,
            num_waiting=self.waiting,
            slots_used=self.slots_used,
            slots_total=self.config.max_num_seqs,
            state_memory_bytes=1024,
            **kw,
        )
        for fn in self.listeners:
            fn(stats)

    async def generate(
        self, prompt: str | list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if len(ids) + (params.max_tokens or 0) > self.model_config.max_model_len:
            raise PromptTooLongError(f"prompt of {len(ids)} tokens does not fit max_model_len 256")
        if self.waiting >= self.max_waiting:
            raise QueueFullError("waiting queue is full", retry_after=2.0)
        start = time.monotonic()
        self.waiting += 1
        try:
            await self.slots.acquire()
        finally:
            self.waiting -= 1
        self.slots_used += 1
        out = RequestOutput(
            request_id,
            prompt if isinstance(prompt, str) else None,
            ids,
            [CompletionOutput(i, "", []) for i in range(params.n)],
        )
        finished = False
        try:
            self._emit(num_prompt_tokens=len(ids), iteration_tokens=len(ids))
            limit = params.max_tokens or 32
            last = [ids[-1] + i for i in range(params.n)]
            while not finished:
                await asyncio.sleep(self.step_s)
                if self.die_after is not None and len(out.outputs[0].token_ids) >= self.die_after:
                    raise EngineDeadError("the engine loop failed: boom")
                for c in out.outputs:
                    t = (last[c.index] * 7 + 3) % 97 + 3
                    last[c.index] = t
                    c.token_ids = c.token_ids + [t]
                    c.text = self.tokenizer.decode(c.token_ids)
                    if params.logprobs is not None:
                        top = [Logprob(t, -0.5, chr(t + 29))] + [
                            Logprob(3 + k, -2.0 - k, chr(32 + k)) for k in range(params.logprobs - 1)
                        ]
                        lp = TokenLogprobs(Logprob(t, -0.5, chr(t + 29)), top[: params.logprobs])
                        c.logprobs = (c.logprobs or []) + [lp]
                    stop = next((s for s in params.stop if s in c.text), None)
                    if stop is not None:
                        c.text = c.text[: c.text.index(stop)]
                        c.finish_reason, c.stop_reason = "stop", stop
                    elif len(c.token_ids) >= limit:
                        c.finish_reason = "length"
                finished = all(c.finished for c in out.outputs)
                out.finished = finished
                self._emit(
                    num_generation_tokens=params.n,
                    iteration_tokens=params.n,
                    finished=[
                        FinishedRequestStats(
                            "length",
                            time.monotonic() - start,
                            0.0,
                            len(ids),
                            sum(len(c.token_ids) for c in out.outputs),
                        )
                    ]
                    if finished
                    else [],
                )
                yield RequestOutput(
                    out.request_id,
                    out.prompt,
                    ids,
                    [
                        CompletionOutput(
                            c.index,
                            c.text,
                            list(c.token_ids),
                            c.finish_reason,
                            c.stop_reason,
                            list(c.logprobs) if c.logprobs else None,
                        )
                        for c in out.outputs
                    ],
                    finished,
                )
        finally:
            if not finished:
                self.aborted.append(request_id)
            self.slots_used -= 1
            self.slots.release()
            self._emit()


@pytest.fixture
async def engine_client() -> AsyncIterator[tuple[FakeEngine, httpx.AsyncClient]]:
    """A fresh fake engine behind the app (lifespan run, 4 KiB body limit) and an in-process client to it."""
    engine = FakeEngine()
    app = create_app(engine, ServerConfig(max_body_bytes=4096))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield engine, client
    assert engine.started and engine.stopped


@pytest.fixture
async def client(engine_client: tuple[FakeEngine, httpx.AsyncClient]) -> httpx.AsyncClient:
    return engine_client[1]
