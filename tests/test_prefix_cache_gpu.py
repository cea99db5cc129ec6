"""The prefix cache on a GPU (gpu marker): with CUDA graphs for decode and prompt steps and overlapped
decoding (the GPU defaults), with eager prompt steps, and through the pinned host tier (demotions on the
side stream), restored requests give the outputs of an engine without the cache; snapshot rows
round-trip bit for bit on the device."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.prefix_cache import StateCopy, Tier
from fenwick_llm.engine.state_snapshot import SnapshotBank, state_stacks

pytestmark = pytest.mark.gpu

GREEDY = dict(temperature=0.0, ignore_eos=True, logprobs=1)
ENGINE = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=256, max_num_batched_tokens=64,
              long_prefill_chunk=16, cuda_graph_batch_sizes=(1, 2, 4, 8))


def conversations(llm: LLM, turns: int, seed: int) -> list[list]:
    """Four conversations of `turns` turns that resend their history, and requests sharing a system
    prompt, some with n = 2 -> per turn the outputs (token ids and logprobs of every sample)."""
    rng = random.Random(seed)
    system = [rng.randrange(1, 390) for _ in range(48)]
    convs = [[rng.randrange(1, 390) for _ in range(rng.randrange(5, 40))] for _ in range(4)]
    results = []
    for _ in range(turns):
        prompts = convs + [system + [rng.randrange(1, 390) for _ in range(6)] for _ in range(3)]
        forks = SamplingParams(max_tokens=5, n=2, **GREEDY)  # the system prompt's requests fork
        params = [SamplingParams(max_tokens=7, **GREEDY)] * 5 + [forks] * 2
        outs = llm.generate(prompts, params)
        results.append([[(c.token_ids, [t.sampled.logprob for t in c.logprobs or []]) for c in o.outputs]
                        for o in outs])
        convs = [c + o.outputs[0].token_ids + [rng.randrange(1, 390)]
                 for c, o in zip(convs, outs, strict=False)]
    return results


def assert_same_outputs(a: list[list], b: list[list]) -> None:
    for turn_a, turn_b in zip(a, b, strict=True):
        for req_a, req_b in zip(turn_a, turn_b, strict=True):
            for (ids_a, lp_a), (ids_b, lp_b) in zip(req_a, req_b, strict=True):
                assert ids_a == ids_b
                assert lp_a == pytest.approx(lp_b, abs=1e-4)


@pytest.mark.parametrize("variant", ["graphs+overlap", "eager-prompts", "host-tier"])
def test_cache_with_cuda_graphs_equals_no_cache(tiny_model_dir: Path, variant: str) -> None:
    extra: dict = {}
    if variant == "eager-prompts":  # decode graphs only: restored slots continue in the eager prompt path
        extra = dict(prefill_graph_max_tokens=0)
    probe = LLM(str(tiny_model_dir), enable_prefix_caching=False, **ENGINE)
    plain = conversations(probe, 3, seed=1)
    if variant == "host-tier":  # three device rows: every step demotes on the side stream
        row = probe.engine.pool.bytes_per_slot
        extra = dict(prefix_cache_bytes=3 * row, prefix_cache_host_bytes=64 * row)
    cached = LLM(str(tiny_model_dir), **ENGINE, **extra)
    assert cached.config.use_cuda_graphs and cached.config.use_overlap_decode
    assert (cached.engine.runner.prefill_graphs is None) == (variant == "eager-prompts")
    outs = conversations(cached, 3, seed=1)
    assert_same_outputs(outs, plain)
    cache = cached.engine.prefix_cache
    assert cache is not None
    stats = cache.take_stats()
    assert stats.hits > 0
    if variant == "host-tier":
        assert cache.num_rows(Tier.HOST) > 0
    assert cached.engine.pool.allocator.num_used == 0


def test_rows_round_trip_on_the_device_and_through_pinned_memory(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), enable_prefix_caching=False, **ENGINE)
    pool = llm.engine.pool.state
    gen = torch.Generator(device="cuda").manual_seed(0)
    for t in state_stacks(pool):
        t.copy_(torch.randn(t.shape, generator=gen, device="cuda"))
    pool.positions[:4] = torch.tensor([5, 77, 3, 200], device="cuda")
    bank = SnapshotBank(pool, llm.engine.model_config, device_rows=2, host_rows=2)
    assert bank.host_levels is not None and bank.host_levels.is_pinned() and bank.side is not None
    want = [t[:, 3].clone() for t in state_stacks(pool)] + [pool.positions[3].clone()]
    bank.copy(pool, [StateCopy(Tier.SLOT, 3, Tier.DEVICE, 0), StateCopy(Tier.DEVICE, 0, Tier.HOST, 1),
                     StateCopy(Tier.SLOT, 0, Tier.DEVICE, 0),  # waits for the demotion reading row 0
                     StateCopy(Tier.HOST, 1, Tier.SLOT, 6), StateCopy(Tier.DEVICE, 0, Tier.SLOT, 7)])
    torch.cuda.synchronize()
    got = [t[:, 6] for t in state_stacks(pool)] + [pool.positions[6]]
    for x, y in zip(got, want, strict=True):
        assert torch.equal(x, y)
    for t in (*state_stacks(pool), pool.positions):
        assert torch.equal(t[:, 7] if t.dim() > 1 else t[7], t[:, 0] if t.dim() > 1 else t[0])
