"""Prompt steps padded to buckets and replayed from CUDA graphs (engine/prefill_batch.py,
engine/prefill_graphs.py).

CPU: the buckets cover every step; a step padded to a bucket (a padding sequence and empty ones in the
dummy slot) gives its own sequences the logits and state of the unpadded step, and touches no other
slot. GPU: a replayed prompt step writes the same logits and state, bit for bit, as the same padded step
run eagerly (same kernels, same shapes), for steps of other lengths, positions and slots each time; the
engine's greedy outputs equal the full forward while its prompt steps replay graphs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.config import EngineConfig
from fenwick_llm.engine.model_state import ModelState
from fenwick_llm.engine.prefill_batch import PrefillShape
from fenwick_llm.engine.prefill_graphs import bucket_shapes, token_buckets
from test_llm import GREEDY, assert_greedy
from tiny import randomize_, tiny_config


def test_token_buckets_cover_every_step():
    """Powers of two up to 256 (a step pads to less than twice its size), then a third at most."""
    sizes = token_buckets(2048)
    assert sizes[:5] == [16, 32, 64, 128, 256] and sizes[-2:] == [1536, 2048]
    for t in range(1, 2049):
        bucket = min(s for s in sizes if s >= t)
        assert (bucket < 2 * t or bucket == 16) if t <= 256 else 3 * (bucket - t) < bucket, t
    assert token_buckets(300)[-1] == 384 and token_buckets(16) == [16]


def test_bucket_shapes_hold_every_step_of_two_tokens_a_sequence():
    shapes = bucket_shapes(512, 16, max_len=1024)
    assert len(set(shapes)) == len(shapes)
    for t in (2, 17, 100, 512):
        for n in range(1, min(16, t // 2) + 1):
            for continuing in (False, True):
                assert any(s.num_tokens >= t and s.num_seqs > n and s.continuing == continuing
                           for s in shapes), (t, n, continuing)
    assert all(2 * (s.num_seqs - 1) <= s.num_tokens for s in shapes)
    # short sequences: a bucket holds no more tokens than its sequences can, from position 0
    assert all(s.num_tokens <= 32 * s.num_seqs for s in bucket_shapes(2048, 4, max_len=32))


def test_padding_spreads_over_sequences_within_the_levels():
    """Spare tokens go to padding sequences of at most max_positions tokens each (levels 6: 32); a step
    whose padding cannot fit so does not fit the bucket."""
    from fenwick_llm.engine.prefill_batch import fits, prefill_arrays
    pad = PrefillShape(96, 4, False)
    parts, layout = prefill_arrays([1] * 10, [3], [0], [10], num_levels=6, window=False, chunk_plan=True,
                                   pad=pad, pad_slot=7)
    assert parts[3].tolist() == [10, 32, 32, 22] and parts[1].tolist() == [3, 7, 7, 7]
    assert layout.num_tokens == 96 and layout.num_real == 1 and parts[0].tolist()[10:] == [0] * 86
    assert not fits(PrefillShape(128, 4, False), 10, 1, False, num_levels=6)  # 118 spare > 3 x 32
    assert not fits(pad, 10, 1, True, num_levels=6)  # a continuing step in a fresh bucket
    with pytest.raises(ValueError, match="does not fit"):
        prefill_arrays([1] * 10, [3], [0], [10], num_levels=6, window=False, chunk_plan=False,
                       pad=PrefillShape(128, 4, False))


def test_settings_are_checked(tiny_model_dir: Path):
    for bad in (dict(prefill_graph_max_tokens=-1), dict(prefill_graph_max_seqs=0)):
        with pytest.raises(ValueError, match="prefill_graph"):
            EngineConfig(str(tiny_model_dir), **bad)


def test_cpu_engine_has_no_prefill_graphs(tiny_model_dir: Path):
    llm = LLM(str(tiny_model_dir), device="cpu", max_num_seqs=2)
    assert llm.engine.runner.prefill_graphs is None


def _tensors(state: ModelState) -> list[torch.Tensor]:
    return [state.all_levels, state.all_conv, state.all_decay, *(state.all_window or ()), state.positions]


def _snapshot(state: ModelState) -> list[torch.Tensor]:
    return [t.clone() for t in _tensors(state)]


def _restore(state: ModelState, snapshot: list[torch.Tensor]) -> None:
    for t, s in zip(_tensors(state), snapshot, strict=True):
        t.copy_(s)


def _slot_rows(tensors: list[torch.Tensor], slots: list[int]) -> list[torch.Tensor]:
    """Rows of ``slots`` in each tensor (dim 1 of the per-layer stacks, dim 0 of positions)."""
    idx = torch.tensor(slots, device=tensors[0].device)
    return [t.index_select(1 if t.dim() > 1 else 0, idx) for t in tensors]


@pytest.mark.parametrize("starts", [[0, 0, 0], [70, 0, 33]], ids=["fresh", "continuing"])
def test_padded_prompt_step_equals_the_unpadded_one(starts: list[int]):
    """CPU (the PyTorch paths): the step's sequences get the same logits and state whether the step is
    padded to a bucket or not; no slot but theirs and the dummy's changes."""
    torch.manual_seed(0)
    from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
    model = LogLinearMamba2ForCausalLM(tiny_config("mlp")).eval()
    randomize_(model)
    state = ModelState.allocate(model.config, 8)
    gen = torch.Generator().manual_seed(1)
    for t in _tensors(state)[:-1]:
        t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
    slots, lens, dummy = [5, 1, 3], [20, 7, 41], 7
    state.reset(torch.tensor(slots))
    if any(starts):  # continuing sequences: bring them to their start positions first
        live = [i for i, s in enumerate(starts) if s]
        ids = torch.randint(1, 300, (sum(starts),), generator=gen).tolist()
        model.run_prefill(model.prefill_batch(ids, [slots[i] for i in live], [0] * len(live),
                                              [starts[i] for i in live], state), state)
    before = _snapshot(state)
    ids = torch.randint(1, 300, (sum(lens),), generator=gen).tolist()
    want = model.run_prefill(model.prefill_batch(ids, slots, starts, lens, state), state)
    unpadded = _snapshot(state)
    _restore(state, before)
    pad = PrefillShape(96, 6, any(starts))
    batch = model.prefill_batch(ids, slots, starts, lens, state, pad=pad, pad_slot=dummy)
    assert batch.ids.numel() == 96 and batch.slots.tolist() == [*slots, dummy, dummy, dummy]
    got = model.run_prefill(batch, state)
    assert got.shape[0] == 6
    torch.testing.assert_close(got[:3], want, rtol=1e-5, atol=1e-5)
    padded = _snapshot(state)
    for a, b in zip(_slot_rows(padded, slots), _slot_rows(unpadded, slots), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    others = [s for s in range(8) if s not in [*slots, dummy]]
    for a, b in zip(_slot_rows(padded, others), _slot_rows(before, others), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replayed_prompt_step_equals_the_eager_padded_step(tiny_model_dir: Path, dtype: str):
    """Steps of other lengths, start positions and slots, fresh and continuing, from one bucket's graph
    each: the same bits as the same padded step run eagerly, and no other slot touched."""
    llm = LLM(str(tiny_model_dir), device="cuda", dtype=dtype, max_num_seqs=8, max_num_batched_tokens=256)
    runner, model = llm.engine.runner, llm.engine.model
    graphs, state, dummy = runner.prefill_graphs, runner.state, llm.engine.pool.dummy_slot
    assert graphs is not None and len(graphs.graphs) == len(graphs.shapes)
    gen = torch.Generator().manual_seed(0)
    steps = [([0, 1, 2], [0, 0, 0], [70, 5, 130]), ([5, 3, 6], [0, 0, 0], [64, 64, 1]),
             ([1, 7, 4], [3, 64, 0], [20, 31, 2]), ([2, 0], [100, 1], [17, 150]), ([6], [0], [200])]
    with torch.inference_mode():
        for slots, starts, lens in steps:
            for t in _tensors(state)[:-1]:  # every slot holds something a stray write would change
                t.copy_(torch.randn(t.shape, generator=gen).to(t.dtype))
            state.positions.zero_()
            state.positions[torch.tensor(slots, device="cuda")] = torch.tensor(starts, device="cuda")
            before = _snapshot(state)
            ids = torch.randint(1, 300, (sum(lens),), generator=gen).tolist()
            shape = graphs.shape_for(sum(lens), len(lens), any(starts))
            got = graphs.run(ids, slots, starts, lens).clone()
            after = _snapshot(state)
            _restore(state, before)
            batch = model.prefill_batch(ids, slots, starts, lens, state, pad=shape, pad_slot=dummy)
            want = model.run_prefill(batch, state)[:len(lens)]
            assert torch.equal(got, want), (slots, starts, lens)
            keep = [s for s in range(state.positions.numel()) if s != dummy]
            for a, b in zip(_slot_rows(after, keep), _slot_rows(_snapshot(state), keep), strict=True):
                assert torch.equal(a, b)
            others = [s for s in keep if s not in slots]
            for a, b in zip(_slot_rows(after, others), _slot_rows(before, others), strict=True):
                assert torch.equal(a, b)
    assert graphs.num_replays == len(steps)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_with_prompt_graphs_matches_the_full_forward(tiny_model_dir: Path, dtype: str):
    """Prompts of 1..90 tokens in chunks of at most 32 (fresh and continuing prompt steps, mixed with
    decodes as requests arrive): greedy equals the full forward (up to near-ties), and the prompt steps
    replayed graphs."""
    llm = LLM(str(tiny_model_dir), device="cuda", dtype=dtype, max_num_seqs=8, long_prefill_chunk=32,
              max_num_batched_tokens=64)
    params = SamplingParams(max_tokens=12, **GREEDY)
    prompts = [[3 + i] * n for i, n in enumerate((40, 7, 90, 1, 33, 64))]
    for out in llm.generate(prompts, params):
        assert_greedy(llm, out, eps=1e-4 if dtype == "float32" else 5e-2)
    assert llm.engine.runner.prefill_graphs.num_replays > 0
    assert llm.engine.pool.allocator.num_used == 0
