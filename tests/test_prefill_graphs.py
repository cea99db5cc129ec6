"""engine/prefill_graphs.py: fresh prompt steps replayed from CUDA graphs.

CPU: the capture policy (a step shape is captured on its second sighting; both the sightings and the
graphs forget the least recent) and the engine's settings. GPU: a replayed prefill, from empty slots or
continuing sequences, writes the same logits and the same state, bit for bit, as the eager prefill, for
new tokens in other slots each time, and touches no other slot; and the engine's outputs equal an eager
engine's while its prompt steps replay graphs.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.config import EngineConfig
from fenwick_llm.engine.prefill_graphs import SecondSighting


def test_second_sighting_counts_and_forgets_the_least_recent():
    seen = SecondSighting(capacity=2)
    assert not seen.see((5,))
    assert seen.see((5,))  # second time
    assert not seen.see((7, 3))
    assert not seen.see((9,))  # (5,) was the least recently seen: dropped
    assert not seen.see((5,))
    assert seen.see((9,))
    seen.forget((9,))
    assert not seen.see((9,))


def test_settings_are_checked(tiny_model_dir: Path):
    for bad in (dict(prefill_graphs=-1), dict(prefill_graph_max_tokens=0)):
        with pytest.raises(ValueError, match="prefill_graph"):
            EngineConfig(str(tiny_model_dir), **bad)


def test_cpu_engine_has_no_prefill_graphs(tiny_model_dir: Path):
    llm = LLM(str(tiny_model_dir), device="cpu", max_num_seqs=2, prefill_graphs=8)
    assert llm.engine.runner.prefill_graphs is None


def _tensors(state) -> list[torch.Tensor]:
    return [state.all_levels, state.all_conv, state.all_decay, *(state.all_window or ()), state.positions]


def _snapshot(state) -> list[torch.Tensor]:
    return [t.clone() for t in _tensors(state)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prefix", [None, [70, 5, 130]], ids=["fresh", "continuing"])
def test_replayed_prefill_equals_eager_prefill(tiny_model_dir: Path, dtype: str, prefix: list[int] | None):
    """Lengths across chunk (64) and window-block (16) bounds, from empty slots or after an eager
    prefix; four rounds of new tokens into other slots: round 0 runs eagerly, round 1 captures, rounds 2
    and 3 replay."""
    llm = LLM(str(tiny_model_dir), device="cuda", dtype=dtype, max_num_seqs=8, prefill_graphs=8)
    runner, model = llm.engine.runner, llm.engine.model
    graphs, state = runner.prefill_graphs, runner.state
    assert graphs is not None
    lens = [20, 64, 3] if prefix else [70, 5, 130]
    starts = prefix or [0, 0, 0]
    cu = torch.tensor([0, *itertools.accumulate(lens)])
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for rnd, slots in enumerate([[0, 1, 2], [0, 1, 2], [5, 3, 6], [1, 7, 4]]):
            for t in _tensors(state)[:-1]:  # every slot holds something a stray write would change
                t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            slots_t = torch.tensor(slots, device="cuda")
            state.reset(slots_t)  # a new request's slot, as the runner resets it
            if prefix:
                ids = torch.randint(1, 300, (sum(prefix),), generator=gen).cuda()
                model.prefill(ids, torch.tensor([0, *itertools.accumulate(prefix)]), state, slots_t, [0] * 3)
            before = _snapshot(state)
            ids = torch.randint(1, 300, (sum(lens),), generator=gen)
            got = graphs.run(ids.tolist(), lens, slots, starts)
            assert (got is None) == (rnd == 0)
            if got is None:
                continue
            got, after = got.clone(), _snapshot(state)
            others = [s for s in range(state.positions.numel()) if s not in slots]
            others = torch.tensor(others, device="cuda")
            for a, b in zip(after, before, strict=True):  # slot: dim 1 of the stacks, dim 0 of positions
                dim = 1 if a.dim() > 1 else 0
                assert torch.equal(a.index_select(dim, others), b.index_select(dim, others))
            for t, b in zip(_tensors(state), before, strict=True):
                t.copy_(b)  # the same start for the eager run
            want = model.prefill(ids.cuda(), cu, state, slots_t, starts)
            assert torch.equal(got, want)
            for a, b in zip(after, _snapshot(state), strict=True):
                assert torch.equal(a, b)
    assert graphs.num_captures == 1 and graphs.num_replays == 2


@pytest.mark.gpu
def test_engine_with_prefill_graphs_matches_eager_engine(tiny_model_dir: Path):
    """Prompts of 40, 7 and 90 tokens in chunks of at most 32 (long_prefill_chunk): fresh and continuing
    prompt steps, the same shapes each round (eager, captured, replayed)."""
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, long_prefill_chunk=32)
    graphs = LLM(str(tiny_model_dir), prefill_graphs=8, **kw)
    eager = LLM(str(tiny_model_dir), **kw)  # the default: prompt steps eager (decode graphs on)
    assert eager.engine.runner.prefill_graphs is None and eager.engine.runner.graphs is not None
    params = SamplingParams(max_tokens=10, logprobs=2, temperature=0.0, ignore_eos=True)
    for rnd in range(3):
        prompts = [[3 + rnd + i] * n for i, n in enumerate((40, 7, 90))]
        a, b = graphs.generate(prompts, params), eager.generate(prompts, params)
        for x, y in zip(a, b, strict=True):
            assert x.outputs[0].token_ids == y.outputs[0].token_ids
            lx = [t.sampled.logprob for t in x.outputs[0].logprobs]
            ly = [t.sampled.logprob for t in y.outputs[0].logprobs]
            assert lx == pytest.approx(ly, abs=1e-4)
    pg = graphs.engine.runner.prefill_graphs
    assert pg.num_captures >= 2 and pg.num_replays >= 2  # fresh and continuing shapes
    assert graphs.engine.pool.allocator.num_used == 0
