"""Issue 19 at the engine edge: every value SamplingParams accepts runs; one request's failure ends only
that request; a failure outside any request stops the loop and tells the death listeners."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.async_llm import AsyncLLM
from fenwick_llm.engine.config import EngineConfig
from fenwick_llm.engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    PromptTooLongError,
    RequestFailedError,
)
from fenwick_llm.engine.loader import load_model

SAMPLE = dict(temperature=1.0, ignore_eos=True, max_tokens=6)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), max_num_seqs=4, max_model_len=64, max_num_batched_tokens=32)


BAD_PARAMS: list[dict[str, Any]] = [
    {"seed": 2**64}, {"seed": -(2**63) - 1}, {"seed": 1.5}, {"seed": True},
    {"top_k": 2**63}, {"top_k": -2}, {"n": True}, {"n": 0}, {"max_tokens": "5"},
    {"temperature": math.nan}, {"temperature": math.inf}, {"top_p": math.nan}, {"min_p": math.nan},
    {"repetition_penalty": math.inf}, {"presence_penalty": math.nan}, {"logprobs": 21},
    {"stop_token_ids": [2**63]}, {"stop_token_ids": [True]}, {"stop": [""]},
]


@pytest.mark.parametrize("kw", BAD_PARAMS, ids=[repr(k) for k in BAD_PARAMS])
def test_sampling_params_reject_what_the_engine_cannot_hold(kw: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw", [
    {"seed": 2**64 - 1}, {"seed": -(2**63)}, {"top_k": 2**63 - 1, "top_p": 0.95},
    {"repetition_penalty": 1e-30}, {"repetition_penalty": 1e30}, {"temperature": 1e30},
], ids=["seed-max", "seed-min", "top-k-int64", "rep-tiny", "rep-huge", "temperature-huge"])
def test_extreme_but_valid_values_generate(llm: LLM, kw: dict[str, Any]) -> None:
    out = llm.generate("Hello", SamplingParams(**{**SAMPLE, **kw}))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 6
    assert llm.engine.pool.allocator.num_used == 0


def test_a_tiny_temperature_is_greedy(llm: LLM) -> None:
    greedy = llm.generate("Hello", SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))
    tiny = llm.generate("Hello", SamplingParams(temperature=1e-30, ignore_eos=True, max_tokens=8))
    assert tiny[0].outputs[0].token_ids == greedy[0].outputs[0].token_ids
    assert tiny[0].outputs[0].text  # no NaN, no empty completion


def test_all_64_bits_of_a_seed_count(llm: LLM) -> None:
    def tokens(seed: int) -> list[int]:
        params = SamplingParams(**{**SAMPLE, "max_tokens": 12, "seed": seed})
        return llm.generate("Once", params)[0].outputs[0].token_ids

    assert tokens(5) == tokens(5)
    assert tokens(5) != tokens(5 + 2**32) and tokens(5) != tokens(5 + 2**63)


def test_prompts_the_engine_cannot_take(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(InvalidRequestError, match="tokenized"):
        llm.generate("bad \ud800 text", SamplingParams())
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate("Hi", SamplingParams(stop_token_ids=[10**6]))

    def no_tokenizing(*args: Any, **kwargs: Any) -> list[int]:
        raise AssertionError("a prompt longer than any context was tokenized")

    monkeypatch.setattr(llm.engine.tokenizer, "encode", no_tokenizing)
    with pytest.raises(PromptTooLongError, match="characters"):
        llm.generate("x" * (llm.engine.max_prompt_chars + 1), SamplingParams())


def test_one_failing_request_ends_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    sampler = llm.engine.sampler
    real = sampler.sample

    def sample(logits: torch.Tensor, seqs: list[Any], *args: Any) -> Any:
        if any(s.request.params.seed == 13 for s in seqs):
            raise ValueError("boom")
        return real(logits, seqs, *args)

    monkeypatch.setattr(sampler, "sample", sample)
    params = [SamplingParams(**{**SAMPLE, "seed": s}) for s in (1, 13, 2)]
    outs = llm.generate(["a b", "c d", "e f"], params)
    assert [o.outputs[0].finish_reason for o in outs] == ["length", "error", "length"]
    assert outs[1].error is not None and "boom" in outs[1].error and outs[0].error is None
    assert len(outs[0].outputs[0].token_ids) == 6 and llm.engine.pool.allocator.num_used == 0


def test_async_engine_survives_a_failing_request_and_dies_loudly(tiny_model_dir: Path) -> None:
    engine = AsyncLLM(EngineConfig(model=str(tiny_model_dir), max_num_seqs=4, max_model_len=64),
                      *load_model(tiny_model_dir))
    deaths: list[BaseException] = []
    engine.add_death_listener(deaths.append)
    real = engine.core.sampler.sample

    def sample(logits: torch.Tensor, seqs: list[Any], *args: Any) -> Any:
        if any(s.request.params.seed == 13 for s in seqs):
            raise ValueError("boom")
        return real(logits, seqs, *args)

    engine.core.sampler.sample = sample  # type: ignore[method-assign]

    async def last(prompt: str, seed: int, rid: str) -> Any:
        outs = [o async for o in engine.generate(prompt, SamplingParams(**{**SAMPLE, "seed": seed}), rid)]
        return outs[-1]

    async def main() -> None:
        await engine.start()
        results = await asyncio.gather(last("a", 1, "ok"), last("b", 13, "bad"), return_exceptions=True)
        assert results[0].outputs[0].finish_reason == "length"
        assert isinstance(results[1], RequestFailedError) and "boom" in str(results[1])
        assert engine.is_running and (await last("c", 2, "after")).finished

        def broken(*args: Any) -> Any:
            raise RuntimeError("device lost")

        engine.core.runner.execute = broken  # type: ignore[method-assign]
        with pytest.raises(EngineDeadError):
            await last("d", 3, "dead")
        assert not engine.is_running and len(deaths) == 1 and "device lost" in repr(deaths[0])
        await engine.shutdown()

    asyncio.run(asyncio.wait_for(main(), timeout=120))
