"""kernels/chunk_plan.py: the Triton prefill's host plan, exact and at a bucket's capacity."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from fenwick_llm.kernels.chunk_plan import ChunkPlan, build_plan, chunk_capacity, plan_arrays


def _exact(starts: list[int], lens: list[int], L: int) -> tuple[list[np.ndarray], object]:
    return plan_arrays(starts, lens, L, chunk_size=16, direct_levels=1)


def test_exact_plan_lists_each_sequences_chunks_and_folds():
    (nc, chunk_seq, bos, start, length, node0, ends, *folds), cap = _exact([3, 0, 40], [30, 2, 60], 10)
    # chunks of 16: [3, 33) spans chunks 0..2, [0, 2) chunk 0, [40, 100) chunks 2..6
    assert nc.tolist() == [3 + 1 + 5] and chunk_seq.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert bos.tolist() == [0, 30, 32] and node0.tolist() == [0, 3, 4] and ends.tolist() == [33, 2, 100]
    assert start.tolist() == [3, 0, 40] and length.tolist() == [30, 2, 60]
    # nodes of more than 2^1 chunks fold: chunk c with ctz(c + 1) = z > 1, not a sequence's last
    assert cap.folds == ((2, 1),) and [f.tolist() for f in folds] == [[5]]  # absolute chunk 3 of sequence 2


def test_capacity_holds_any_step_and_pads_with_markers():
    rng = random.Random(0)
    L = 12  # 2048 positions
    cap = chunk_capacity(256, 5, L, chunk_size=16, direct_levels=1)
    for _ in range(200):
        n = rng.randint(1, 5)
        lens = [rng.randint(0, 256 // n) for _ in range(n)]
        starts = [rng.randint(0, 2048 - 1 - 256) for _ in range(n)]
        parts, used = plan_arrays(starts, lens, L, 16, 1, cap)
        exact, _ = _exact(starts, lens, L)
        assert used == cap and [p.size for p in parts] == cap.part_sizes(n)
        NC = int(parts[0][0])
        assert NC == exact[0][0] and parts[1][:NC].tolist() == exact[1].tolist()
        for (z, slots), got in zip(cap.folds, parts[7:], strict=True):
            real = got[got >= 0]
            assert (got[len(real):] == -1).all() and len(got) == slots
            want = dict(zip([z for z, _ in _exact(starts, lens, L)[1].folds], exact[7:], strict=True))
            assert real.tolist() == want.get(z, np.zeros(0)).tolist()


def test_too_small_a_capacity_is_an_error():
    cap = chunk_capacity(32, 1, 10, chunk_size=16, direct_levels=1)
    with pytest.raises(ValueError, match="capacity"):
        plan_arrays([0, 0], [40, 40], 10, 16, 1, cap)
    with pytest.raises(ValueError, match="levels hold at most"):
        plan_arrays([500], [20], 10, 16, 1)


def test_bound_plan_views_one_buffer():
    plan = build_plan([3, 0], [30, 2], 10, torch.device("cpu"), 16, 1)
    assert isinstance(plan, ChunkPlan) and plan.num_seqs == 2 and plan.num_chunks.tolist() == [4]
    base = plan.num_chunks.untyped_storage().data_ptr()
    for t in (plan.chunk_seq, *plan.seq_rows, plan.ends):
        assert t.untyped_storage().data_ptr() == base and (t.data_ptr() - base) % 16 == 0
