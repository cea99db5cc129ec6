"""The engine core's process loop (engine/core_proc.py, here in a thread) and its client
(engine/core_client.py) give what the in-process engine gives: the same tokens, text, stop strings,
logprobs and n > 1 samples, structured outputs (a grammar's end, its dead end) and prefix-cache hits;
aborts, stops and rejections free or refuse slots; a slow reader holds one piece of news; a failing core
ends every stream."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from fenwick_llm.engine.config import EngineConfig
from fenwick_llm.engine.core_client import AsyncEngineClient
from fenwick_llm.engine.core_proc import EngineCoreProc
from fenwick_llm.engine.engine_core import EngineCore
from fenwick_llm.engine.errors import EngineDeadError, InvalidRequestError, QueueFullError
from fenwick_llm.engine.grammar import GrammarError
from fenwick_llm.engine.llm import LLM
from fenwick_llm.engine.loader import load_model
from fenwick_llm.engine.messages import Shutdown
from fenwick_llm.engine.outputs import RequestOutput
from fenwick_llm.engine.sampling_params import SamplingParams
from fenwick_llm.engine.stats import EngineStats
from fenwick_llm.engine.structured_params import StructuredOutputsParams
from fenwick_llm.engine.tokenizer import Tokenizer

GREEDY = dict(temperature=0.0, ignore_eos=True)
CONFIG = dict(max_num_seqs=4, max_model_len=128, max_waiting=2)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), device="cpu", **CONFIG)


class CoreThread:
    """EngineCoreProc's loop in a thread of this process, with a client on the test's event loop."""

    def __init__(self, model_dir: Path, address: str, **config: Any) -> None:
        engine_config = EngineConfig(model=str(model_dir), device="cpu", **{**CONFIG, **config})
        self.core = EngineCore(engine_config, *load_model(model_dir), detokenize=False)
        self.proc = EngineCoreProc(self.core, address)
        self.address = address
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.tokenizer = Tokenizer.from_dir(model_dir)

    def _run(self) -> None:
        try:
            self.proc.run()
        except BaseException as e:  # what the process would die of: the client is told
            self.error = e
            self.proc.close(dead=repr(e))
            return
        self.proc.close()

    def client(self, **kw: Any) -> AsyncEngineClient:
        return AsyncEngineClient(self.proc.info(), self.address, self.tokenizer, **kw)

    def stop(self) -> None:
        if self.thread.is_alive():
            with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as control:
                control.setsockopt(zmq.LINGER, 1000)
                control.connect(self.address)
                control.send(msgspec.msgpack.encode(Shutdown()))
                self.thread.join(10)


@pytest.fixture
def core(tiny_model_dir: Path, tmp_path: Path) -> Iterator[CoreThread]:
    c = CoreThread(tiny_model_dir, f"ipc://{tmp_path}/core")
    yield c
    c.stop()


@pytest.fixture
async def client(core: CoreThread) -> AsyncIterator[AsyncEngineClient]:
    c = core.client()
    await c.start()
    yield c
    await c.shutdown(drain=False)


async def last(client: AsyncEngineClient, prompt: Any, params: SamplingParams, rid: str) -> RequestOutput:
    return [o async for o in client.generate(prompt, params, rid)][-1]


async def until(cond: Any, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


CASES = {
    "greedy": ("Hello, world!", dict(max_tokens=12, **GREEDY)),
    "ids": ([5, 6, 7, 8], dict(max_tokens=9, **GREEDY)),
    "logprobs": ("Once upon", dict(max_tokens=6, logprobs=3, **GREEDY)),
    "seeded-n3": ("The quick", dict(max_tokens=8, n=3, temperature=1.0, seed=7, ignore_eos=True)),
    "min-tokens-eos": ("Fenwick", dict(max_tokens=20, min_tokens=3, temperature=0.9, seed=3)),
    "n2-stop-strings": ("A long time", dict(max_tokens=24, n=2, temperature=1.0, seed=11, stop=["e", "a"],
                                           ignore_eos=True)),
}


OBJECT = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}
STRUCTURED = {  # the grammar ends a sample ("stop" on a token that is text), cuts it, or dead-ends it
    "json-n2-logprobs": dict(n=2, temperature=1.0, seed=5, logprobs=2, max_tokens=80,
                             structured_outputs=StructuredOutputsParams(json=OBJECT)),
    "choice-min-tokens": dict(temperature=1.0, seed=2, min_tokens=30, ignore_eos=True, max_tokens=40,
                              structured_outputs=StructuredOutputsParams(choice=("yes", "no way"))),
    "regex-stop-string": dict(temperature=1.0, seed=4, max_tokens=40, stop=["-"],
                              structured_outputs=StructuredOutputsParams(regex=r"[A-Z]{3}-[0-9]{2,4}")),
    "json-length": dict(max_tokens=3, structured_outputs=StructuredOutputsParams(json=OBJECT)),
    "dead-end": dict(max_tokens=20, structured_outputs=StructuredOutputsParams(regex=r"[^\s\S]")),
}
CASES.update({name: ("Answer in JSON:", kw) for name, kw in STRUCTURED.items()})


@pytest.mark.parametrize("case", list(CASES))
async def test_outputs_equal_the_in_process_engine(llm: LLM, client: AsyncEngineClient, case: str) -> None:
    prompt, kw = CASES[case]
    params = SamplingParams(**kw)
    want = llm.generate(prompt, params)[0]
    got = await last(client, prompt, params, case)
    assert got.finished and got.prompt_token_ids == want.prompt_token_ids
    for g, w in zip(got.outputs, want.outputs, strict=True):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
            w.token_ids, w.text, w.finish_reason, w.stop_reason)
        assert g.logprobs == w.logprobs
    if case == "dead-end":
        assert got.outputs[0].finish_reason == "grammar_error" and got.outputs[0].stop_reason


async def test_grammars_compile_in_the_api_server_and_the_core_compiles_its_own(
        core: CoreThread, client: AsyncEngineClient) -> None:
    """A constraint that cannot compile is the request's error here, before the core sees it; one that
    compiles is compiled once per side (the core's cache is its own process's)."""
    bad = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(unclosed"))
    with pytest.raises(GrammarError, match="regular expression"):
        await last(client, "x", bad, "bad")
    assert not core.core.has_unfinished()
    spec = StructuredOutputsParams(regex=r"[a-z]{4}")
    assert client.grammars is not None and core.core.grammars is not None
    assert client.grammars is not core.core.grammars
    out = await last(client, "x", SamplingParams(max_tokens=10, structured_outputs=spec), "good")
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].text) == 4
    assert core.core.grammars.get(spec)[1] is False  # cached in the core by then


async def test_cached_tokens_reach_the_client(llm: LLM, client: AsyncEngineClient) -> None:
    """A prompt that extends an earlier one restores the earlier one's state (its end is saved):
    num_cached_tokens and the tokens as in the in-process engine."""
    prompt = list(range(40, 72))  # no other test's prefix: the module's LLM keeps its cache
    prompts = [prompt, [*prompt, 3]]
    params = SamplingParams(max_tokens=4, **GREEDY)
    want = [llm.generate(p, params)[0] for p in prompts]
    got = [await last(client, p, params, f"again-{i}") for i, p in enumerate(prompts)]
    assert [g.num_cached_tokens for g in got] == [w.num_cached_tokens for w in want] == [0, len(prompt)]
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]


async def test_stop_strings_end_the_sample_here_and_free_the_slot(llm: LLM, core: CoreThread,
                                                                  client: AsyncEngineClient) -> None:
    full = llm.generate("Hello, world!", SamplingParams(max_tokens=24, **GREEDY))[0].outputs[0]
    stop = full.text[6:9]
    for include in (False, True):
        params = SamplingParams(max_tokens=24, stop=[stop], include_stop_str_in_output=include, **GREEDY)
        want = llm.generate("Hello, world!", params)[0].outputs[0]
        snaps = [o async for o in client.generate("Hello, world!", params, f"stop-{include}")]
        got = snaps[-1].outputs[0]
        assert (got.text, got.token_ids, got.finish_reason, got.stop_reason) == (
            want.text, want.token_ids, "stop", stop)
        assert all(got.text.startswith(s.outputs[0].text) for s in snaps)  # nothing streamed is retracted
    await until(lambda: core.core.pool.allocator.num_used == 0 and not core.core.has_unfinished())


async def test_abort_stop_and_rejections(core: CoreThread, client: AsyncEngineClient) -> None:
    stats: list[EngineStats] = []
    client.add_stats_listener(stats.append)
    long = SamplingParams(max_tokens=100, **GREEDY)
    streams = [client.generate([5, 6, 7], long, f"r{i}") for i in range(4)]
    for s in streams:
        await s.__anext__()  # type: ignore[attr-defined]
    assert core.core.pool.allocator.num_used == 4
    waiting = [asyncio.create_task(last(client, [8, 9], long, f"w{i}")) for i in range(2)]
    await until(lambda: core.core.scheduler.num_waiting == 2)
    with pytest.raises(QueueFullError):
        await last(client, [8, 9], long, "full")
    with pytest.raises(InvalidRequestError):
        await last(client, [5], SamplingParams(n=5), "too-many-samples")  # checked here, before the core
    for s in streams:
        await s.aclose()  # type: ignore[attr-defined]
    for w in waiting:
        w.cancel()
    await until(lambda: core.core.pool.allocator.num_used == 0 and not core.core.has_unfinished())
    await until(lambda: sum(f.finish_reason == "abort" for s in stats for f in s.finished) == 6)
    assert stats[-1].slots_used == 0 and stats[-1].num_running == 0


async def test_explicit_abort_returns_once_the_slot_is_free(core: CoreThread,
                                                             client: AsyncEngineClient) -> None:
    outs: list[RequestOutput] = []

    async def consume() -> None:
        async for o in client.generate([5, 6, 7], SamplingParams(max_tokens=100, **GREEDY), "x"):
            outs.append(o)

    task = asyncio.create_task(consume())
    await until(lambda: len(outs) >= 2)
    await client.abort("x")
    assert core.core.pool.allocator.num_used == 0
    await asyncio.wait_for(task, 10)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"


async def test_a_slow_reader_holds_one_piece_of_news(core: CoreThread, client: AsyncEngineClient) -> None:
    stream = client.generate([5, 6, 7], SamplingParams(max_tokens=60, **GREEDY), "slow")
    first = await stream.__anext__()  # type: ignore[attr-defined]
    tracked = client.outputs.requests["slow"]
    await until(lambda: len(tracked.request.seqs[0].token_ids) == 60)
    assert len(tracked.holder) <= 1
    rest = [o async for o in stream]
    assert len(rest) == 1 and rest[0].finished and len(rest[0].outputs[0].token_ids) == 60
    assert rest[0].outputs[0].token_ids[:len(first.outputs[0].token_ids)] == first.outputs[0].token_ids


async def test_stream_interval_wakes_the_reader_every_k_tokens(core: CoreThread) -> None:
    client = core.client(stream_interval=4)
    await client.start()
    try:
        counts = [len(o.outputs[0].token_ids)
                  async for o in client.generate([5, 6], SamplingParams(max_tokens=10, **GREEDY), "k")]
    finally:
        await client.shutdown()
    assert counts[0] >= 1 and counts[-1] == 10
    assert all(b - a >= 4 for a, b in zip(counts[:-2], counts[1:-1], strict=True))


async def test_a_failing_core_ends_every_stream(core: CoreThread, client: AsyncEngineClient) -> None:
    deaths: list[BaseException] = []
    client.add_death_listener(deaths.append)
    stream = client.generate([5, 6, 7], SamplingParams(max_tokens=100, **GREEDY), "doomed")
    await stream.__anext__()  # type: ignore[attr-defined]

    def broken(*args: Any) -> Any:
        raise RuntimeError("device lost")

    core.core.runner.execute = broken  # type: ignore[method-assign]
    with pytest.raises(EngineDeadError, match="device lost"):
        async for _ in stream:
            pass
    assert len(deaths) == 1 and not client.is_running
    with pytest.raises(EngineDeadError):
        await last(client, [5], SamplingParams(), "late")


async def test_a_new_grammar_compiles_beside_the_running_steps(core: CoreThread,
                                                               client: AsyncEngineClient) -> None:
    """A grammar the core has not seen compiles in a worker thread: the running requests keep stepping
    meanwhile, the constrained request joins once it is ready, and one aborted while it waits for its
    grammar ends without ever taking a slot."""
    grammars = core.core.grammars
    assert grammars is not None
    gate, started = threading.Event(), threading.Event()
    compile_ = grammars.compile

    def slow(params: StructuredOutputsParams) -> Any:
        started.set()
        gate.wait(30)
        return compile_(params)

    grammars.compile = slow  # type: ignore[method-assign]
    runner = client.generate([5, 6, 7], SamplingParams(max_tokens=100, **GREEDY), "runs")
    try:
        await runner.__anext__()  # type: ignore[attr-defined]
        tokens = client.outputs.requests["runs"].request.seqs[0].token_ids
        five = SamplingParams(max_tokens=10, structured_outputs=StructuredOutputsParams(regex=r"[a-z]{5}"))
        waits = asyncio.create_task(last(client, "x", five, "waits"))
        await until(started.is_set)
        seen = len(tokens)
        await until(lambda: len(tokens) >= seen + 5)  # steps go on while the grammar compiles
        assert not waits.done() and "waits" in core.proc.compiling

        three = SamplingParams(max_tokens=10, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}"))
        gone = asyncio.create_task(last(client, "y", three, "gone"))
        await until(lambda: "gone" in core.proc.compiling)
        await client.abort("gone")
        assert "gone" not in core.proc.compiling and core.core.pool.allocator.num_used == 1
        assert (await asyncio.wait_for(gone, 10)).finished
    finally:
        gate.set()
        await runner.aclose()  # type: ignore[attr-defined]
    out = await asyncio.wait_for(waits, 30)
    assert out.outputs[0].finish_reason == "stop" and len(out.outputs[0].text) == 5
    await until(lambda: not core.proc.compiling and core.core.pool.allocator.num_used == 0)
    assert "gone" not in core.core.requests
