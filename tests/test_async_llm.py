"""AsyncLLM on a tiny model: streaming, abort by closing the iterator, abort(), queue bound, drain, stats."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from fenwick_llm.engine.async_llm import AsyncLLM
from fenwick_llm.engine.config import EngineConfig
from fenwick_llm.engine.errors import EngineDeadError, QueueFullError
from fenwick_llm.engine.loader import load_model
from fenwick_llm.engine.outputs import RequestOutput
from fenwick_llm.engine.sampling_params import SamplingParams
from fenwick_llm.engine.stats import EngineStats

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> tuple[Any, Any]:
    return load_model(tiny_model_dir)


def run(loaded: tuple[Any, Any], model_dir: Path, body: Callable[[AsyncLLM], Awaitable[None]],
        **config: Any) -> AsyncLLM:
    engine = AsyncLLM(EngineConfig(model=str(model_dir), **config), *loaded)

    async def main() -> None:
        await engine.start()
        try:
            await asyncio.wait_for(body(engine), timeout=120)
        finally:
            await engine.shutdown(drain=False)

    asyncio.run(main())
    return engine


async def until(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_streams_cumulative_outputs_ending_finished(loaded: tuple[Any, Any], tiny_model_dir: Path) -> None:
    stats: list[EngineStats] = []

    async def body(engine: AsyncLLM) -> None:
        engine.add_stats_listener(stats.append)
        params = SamplingParams(max_tokens=6, **GREEDY)
        snaps = [o async for o in engine.generate("Hello, world!", params, "a")]
        assert snaps[-1].finished and not any(s.finished for s in snaps[:-1])
        final = snaps[-1].outputs[0]
        assert len(final.token_ids) == 6 and final.finish_reason == "length"
        assert all(final.token_ids[:len(s.outputs[0].token_ids)] == s.outputs[0].token_ids for s in snaps)
        assert all(final.text.startswith(s.outputs[0].text) for s in snaps)
        offline = engine.core.make_request("b", "Hello, world!", SamplingParams(max_tokens=6, **GREEDY))
        assert snaps[-1].prompt_token_ids == offline.prompt_token_ids

    run(loaded, tiny_model_dir, body, max_num_seqs=2)
    assert stats and stats[-1].slots_total == 2 and stats[-1].state_memory_bytes > 0
    assert sum(s.num_generation_tokens for s in stats) == 6
    assert [f.finish_reason for s in stats for f in s.finished] == ["length"]
    assert len([t for s in stats for t in s.time_to_first_tokens]) == 1
    assert len([t for s in stats for t in s.inter_token_latencies]) == 5


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_closing_the_iterator_aborts_and_frees_the_slot(loaded: tuple[Any, Any], tiny_model_dir: Path,
                                                        overlap: bool) -> None:
    finished: list[str] = []

    async def body(engine: AsyncLLM) -> None:
        engine.add_stats_listener(lambda s: finished.extend(f.finish_reason for f in s.finished))
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=500, **GREEDY), "long")
        got = [await stream.__anext__() for _ in range(2)]
        assert not got[-1].finished and engine.core.pool.allocator.num_used == 1
        await stream.aclose()  # type: ignore[attr-defined]
        await until(lambda: engine.core.pool.allocator.num_used == 0 and "abort" in finished)
        assert not engine.core.has_unfinished()
        # the slot serves the next request from a clean state, whatever step was queued ahead in it
        again = [o async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, **GREEDY), "b")]
        first = got[-1].outputs[0].token_ids  # greedy: the same prompt starts the same way
        assert first and again[-1].outputs[0].token_ids[:len(first)] == first

    run(loaded, tiny_model_dir, body, max_num_seqs=2, overlap_decode=overlap)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_abort_ends_the_stream_with_abort(loaded: tuple[Any, Any], tiny_model_dir: Path,
                                          overlap: bool) -> None:
    async def body(engine: AsyncLLM) -> None:
        outs: list[RequestOutput] = []

        async def consume() -> None:
            async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=500, **GREEDY), "x"):
                outs.append(o)

        task = asyncio.create_task(consume())
        await until(lambda: len(outs) >= 2)
        await engine.abort("x")
        assert engine.core.pool.allocator.num_used == 0
        await asyncio.wait_for(task, 10)
        assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"

    run(loaded, tiny_model_dir, body, max_num_seqs=2, overlap_decode=overlap)


def test_queue_full_and_cancelled_consumer(loaded: tuple[Any, Any], tiny_model_dir: Path) -> None:
    async def body(engine: AsyncLLM) -> None:
        params = SamplingParams(max_tokens=500, **GREEDY)
        running = engine.generate([1, 2], params, "running")
        await running.__anext__()  # holds the only slot

        async def drain(rid: str) -> None:
            async for _ in engine.generate([3, 4], params, rid):
                pass

        waiting = asyncio.create_task(drain("waiting"))
        await until(lambda: engine.core.scheduler.num_waiting == 1)
        with pytest.raises(QueueFullError):
            await engine.generate([5], params, "rejected").__anext__()  # type: ignore[attr-defined]
        waiting.cancel()  # a client gone while queued
        await until(lambda: engine.core.scheduler.num_waiting == 0)
        await running.aclose()  # type: ignore[attr-defined]
        await until(lambda: engine.core.pool.allocator.num_used == 0)

    run(loaded, tiny_model_dir, body, max_num_seqs=1, max_waiting=1)


def test_shutdown_drains_running_requests(loaded: tuple[Any, Any], tiny_model_dir: Path) -> None:
    async def main() -> None:
        engine = AsyncLLM(EngineConfig(model=str(tiny_model_dir), max_num_seqs=2), *loaded)
        await engine.start()
        outs: list[RequestOutput] = []

        async def consume(rid: str) -> None:
            async for o in engine.generate([5, 6, 7], SamplingParams(max_tokens=4, **GREEDY), rid):
                outs.append(o)

        tasks = [asyncio.create_task(consume(f"r{i}")) for i in range(3)]
        await until(lambda: len(outs) > 0)
        await asyncio.wait_for(engine.shutdown(drain=True), 60)
        await asyncio.gather(*tasks)
        done = [o for o in outs if o.finished]
        assert len(done) == 3 and all(o.outputs[0].finish_reason == "length" for o in done)
        with pytest.raises(EngineDeadError):
            await engine.generate([1], SamplingParams(), "late").__anext__()  # type: ignore[attr-defined]

    asyncio.run(main())
