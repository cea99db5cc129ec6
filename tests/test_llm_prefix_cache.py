"""The offline engine with the prefix cache (tiny random model, fp32, CPU): requests that restore a cached
state give the outputs of the same requests without the cache, at every position class, through forks,
eviction and the host tier, with and without overlapped decoding; second turns of a chat restore the first.

Restore + continuation moves the prompt's chunk boundaries, so outputs compare as greedy tokens (near-ties
within GREEDY_EPS of the full forward's argmax) and logprobs within 1e-4, not bit for bit."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.outputs import RequestOutput
from fenwick_llm.engine.prefix_cache import Tier
from fenwick_llm.models import demo_model_dir
from test_llm import assert_greedy

GREEDY = dict(temperature=0.0, ignore_eos=True)
ENGINE = dict(max_num_seqs=6, max_model_len=256, max_num_batched_tokens=48, long_prefill_chunk=16)
POSITIONS = [1, 2, 3, 7, 8, 31, 32, 33, 63, 64, 100]  # 2^k - 1, 2^k, odd, in / at the end of a window block


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), enable_prefix_caching=False, **ENGINE)


@pytest.fixture(scope="module", params=[False, True], ids=["serial", "overlap"])
def cached(tiny_model_dir: Path, request: pytest.FixtureRequest) -> LLM:
    return LLM(str(tiny_model_dir), overlap_decode=request.param, **ENGINE)


def prompts(seed: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 390) for _ in range(length)] for _ in range(n)]


def assert_same(cached: LLM, a: RequestOutput, b: RequestOutput) -> None:
    """Greedy outputs of two paths: the same tokens up to near-ties, logprobs within 1e-4."""
    assert len(a.outputs) == len(b.outputs)
    for i, (x, y) in enumerate(zip(a.outputs, b.outputs, strict=True)):
        if x.token_ids != y.token_ids:
            assert_greedy(cached, a, sample=i)  # a near-tie: still the argmax within GREEDY_EPS
        if x.logprobs is not None and y.logprobs is not None and x.token_ids == y.token_ids:
            assert [t.sampled.logprob for t in x.logprobs] == pytest.approx(
                [t.sampled.logprob for t in y.logprobs], abs=1e-4)


def test_restore_at_every_position_class(cached: LLM, plain: LLM) -> None:
    """A first request of p tokens leaves its state at p; a longer one restores it and prefills the rest."""
    params = SamplingParams(max_tokens=6, logprobs=1, **GREEDY)
    bases = prompts(1, len(POSITIONS), max(POSITIONS) + 12)
    firsts = [b[:p] for b, p in zip(bases, POSITIONS, strict=True)]
    seconds = [b[:p] + b[p:p + 5 + p % 7] for b, p in zip(bases, POSITIONS, strict=True)]
    cached.generate(firsts, SamplingParams(max_tokens=1, **GREEDY))
    outs = cached.generate(seconds, params)
    assert [o.num_cached_tokens for o in outs] == POSITIONS
    for a, b in zip(outs, plain.generate(seconds, params), strict=True):
        assert b.num_cached_tokens == 0
        assert_same(cached, a, b)
        assert_greedy(cached, a)


def test_conversation_turns_resume_where_the_last_turn_stopped(cached: LLM, plain: LLM) -> None:
    """Each turn resends the history (prompt + reply) and a new message: it restores the end of the
    previous turn (prompt + reply without its last token, or with it where a decode queued ahead took it)."""
    params = SamplingParams(max_tokens=7, logprobs=1, **GREEDY)
    convs = prompts(2, 3, 20)
    for turn in range(3):
        outs = cached.generate(convs, params)
        refs = plain.generate(convs, params)
        for conv, a, b in zip(convs, outs, refs, strict=True):
            assert_same(cached, a, b)
            if turn:
                assert a.num_cached_tokens >= len(conv) - 9  # all but the new message and a reply token
        convs = [c + o.outputs[0].token_ids + [11, 12] for c, o in zip(convs, outs, strict=True)]


def test_shared_prefix_and_forks_from_a_restored_state(cached: LLM, plain: LLM) -> None:
    """A system prompt shared by requests that diverge after it: the first divergent request snapshots at
    the branch point, the next ones restore there; n > 1 samples fork from the restored, continued state."""
    system = prompts(3, 1, 70)[0]
    asks = [system + p for p in prompts(4, 4, 9)]
    greedy = SamplingParams(max_tokens=5, **GREEDY)
    cached.generate([system + [1, 2, 3]], greedy)
    first = cached.generate(asks[0], greedy)[0]
    assert first.num_cached_tokens == 0  # the path is known, no state on it yet: a snapshot at 70
    sampled = SamplingParams(max_tokens=6, n=3, temperature=1.0, seed=7, ignore_eos=True, logprobs=1)
    outs = cached.generate(asks[1:], sampled)
    assert [o.num_cached_tokens for o in outs] == [70] * 3
    for a, b in zip(outs, plain.generate(asks[1:], sampled), strict=True):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert_same(cached, a, b)


@pytest.mark.parametrize("host", [0, 2], ids=["device", "device+host"])
def test_eviction_under_pressure(tiny_model_dir: Path, plain: LLM, host: int) -> None:
    """Room for three snapshots (plus two in host memory) and four conversations of two or more snapshots
    a turn: they evict each other, outputs stay those without the cache, the cache never holds more rows
    than it has, and the last conversations to finish still find their state."""
    probe = LLM(str(tiny_model_dir), **ENGINE)
    row = probe.engine.pool.bytes_per_slot
    llm = LLM(str(tiny_model_dir), prefix_cache_bytes=3 * row, prefix_cache_host_bytes=host * row,
              prefix_cache_interval=16 * host, **ENGINE)
    cache = llm.engine.prefix_cache
    assert cache is not None and (cache.config.device_rows, cache.config.host_rows) == (3, host)
    params = SamplingParams(max_tokens=4, **GREEDY)
    convs = prompts(5, 4, 40)
    hits = 0
    for _ in range(3):
        outs = llm.generate(convs, params)
        for a, b in zip(outs, plain.generate(convs, params), strict=True):
            assert_same(llm, a, b)
        hits += sum(o.num_cached_tokens > 0 for o in outs)
        device, on_host = cache.num_rows(Tier.DEVICE), cache.num_rows(Tier.HOST)
        assert device <= 3 and on_host <= host and device + on_host >= 3  # full
        convs = [c + o.outputs[0].token_ids + [7] for c, o in zip(convs, outs, strict=True)]
    assert hits > 0
    assert all(not s.locks for lru in cache.lru.values() for s in lru)


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_chat_turns_of_the_demo_model_resume_exactly(overlap: bool) -> None:
    """Through the demo model's chat template: its replies end with EOS, which the template renders as
    the same token, and re-tokenize to the tokens generated, so each turn restores the previous one's
    end (prompt + reply without EOS; with it where a decode queued ahead fed it) and prefills only the
    new user message."""
    llm = LLM(str(demo_model_dir()), max_num_seqs=2, max_model_len=512, overlap_decode=overlap)
    tok = llm.get_tokenizer()
    messages = [{"role": "system", "content": "You are a terse assistant."},
                {"role": "user", "content": "Hello, world! How are you today?"}]
    last = 0
    for turn in range(3):
        text = tok.apply_chat_template(messages, add_generation_prompt=True)
        prompt = tok.encode(text, add_special_tokens=False)
        out = llm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0))[0]
        reply = out.outputs[0]
        assert reply.finish_reason == "stop" and out.num_cached_tokens == last
        last = len(prompt) + len(reply.token_ids) - (0 if overlap else 1)
        messages += [{"role": "assistant", "content": reply.text},
                     {"role": "user", "content": f"Tell me more about {turn}."}]
