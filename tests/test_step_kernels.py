"""The Triton decode step's two forms (kernels/fused_recurrent.py) against the fp64 reference.

The level loop (one level after the other) and the tiled form (all levels of a [BK, BV] tile at once,
with float32 read-outs per block of K left unsummed when ``partials``) run under TRITON_INTERPRET=1 in a
subprocess (this file as a script), like tests/test_triton_kernels.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interpreted import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # positions, (G, H, K, V, L), kwargs of fused_recurrent_step
    "loop_edges": ([0, 1, 7, 8, 15, 16, 255, 1000], (2, 2, 16, 16, 12), dict(tile=False, block_v=16)),
    "tile_default_edges": ([0, 1, 7, 8, 15, 16, 255, 1000], (2, 2, 16, 16, 12), dict(tile=True)),
    "tile_partials": ([3, 64, 127, 2047], (1, 3, 16, 24, 12), dict(tile=True, block_k=4, block_v=16,
                                                                    partials=True)),
    "tile_one_k_block": ([5, 6], (1, 2, 32, 16, 9), dict(tile=True, block_k=32, block_v=16)),
    "auto_choice": ([2, 9, 33], (1, 2, 16, 16, 10), {}),
    "loop_bf16_pool": ([1, 6, 64, 300], (1, 2, 16, 16, 10), dict(tile=False, pool_dtype=torch.bfloat16)),
    "tile_bf16_pool": ([1, 6, 64, 300], (1, 2, 16, 16, 10), dict(tile=True, pool_dtype=torch.bfloat16)),
}
TOL = {"loop_bf16_pool": 1e-2, "tile_bf16_pool": 1e-2}  # the pool rounds every written level to bf16


def _run_case(positions, shape, kw, seed=1) -> dict:
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    from test_triton_kernels import _inputs, _rel, _states

    G, H, K, V, L = shape
    kw = dict(kw)
    pool_dtype = kw.pop("pool_dtype", torch.float32)
    N = len(positions)
    pos = torch.tensor(positions)
    slots = torch.randperm(N + 3, generator=torch.Generator().manual_seed(seed))[:N]
    pool = torch.full((N + 3, L, H, K, V), float("nan"))
    pool[slots] = _states(positions, G, H, K, V, L, seed=seed * 1000).float()
    pool = pool.to(pool_dtype)
    q, k, v, g, lam = (x[0] for x in _inputs(1, N, G, H, K, V, L, seed=seed, gmax=1.0))
    ref_pool = pool.double()
    ro = naive.fused_recurrent_step_ref(q.double(), k.double(), v.double(), g.double(), lam.double(),
                                        ref_pool, slots, pos)
    o = fused_recurrent_step(q, k, v, g, lam, pool, slots, pos, **kw)
    partial_shape = list(o.shape) if kw.get("partials") else None
    if o.dim() == 4:
        o = o.sum(0)
    untouched = [i for i in range(N + 3) if i not in slots.tolist()]
    return {"o": _rel(o, ro), "state": _rel(pool[slots], ref_pool[slots]), "partial_shape": partial_shape,
            "others_untouched": bool(torch.isnan(pool[untouched]).all())}


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_step_forms_match_reference(results, case):
    r = results[case]
    tol = TOL.get(case, 1e-5)
    assert r["o"] < tol and r["state"] < tol and r["others_untouched"], r


def test_partials_are_per_block_of_k(results):
    # K = 16 in blocks of 4: four float32 read-outs of [N, H, V] = [4, 3, 24]
    assert results["tile_partials"]["partial_shape"] == [4, 4, 3, 24]


if __name__ == "__main__":
    print(json.dumps({name: _run_case(*args) for name, args in CASES.items()}))


def test_prefill_plan_is_shared_only_inside_plan_cache():
    from fenwick_llm.kernels.chunk import _plan, plan_cache

    cu = torch.tensor([0, 5, 70, 71])
    pos = torch.tensor([0, 130, 7])
    args = (1, 71, cu, pos, 12, 16, 1, torch.device("cpu"))
    assert _plan(*args) is not _plan(*args)  # no cache outside the block
    with plan_cache():
        first = _plan(*args)
        assert _plan(*args) is first  # the same tensors: the same plan, no second read-back
        other = _plan(1, 71, cu, pos.clone(), 12, 16, 1, torch.device("cpu"))
        assert other is not first and other.ends.tolist() == first.ends.tolist() == [5, 195, 8]
    # every plan tensor starts 16-byte aligned (Triton compiles per pointer alignment), for odd counts too
    assert all(t.data_ptr() % 16 == 0 for t in (*first.device_rows, *first.fold_idx, first.ends))
    with plan_cache():
        assert _plan(*args) is not first  # the cache ends with its block
    # values the caller already knows are taken instead of reading the tensors back (here they differ
    # from the tensors' contents on purpose, to show which one was read)
    with plan_cache(known=[(cu, [0, 2, 70, 71]), (pos, [1, 2, 3])]):
        assert _plan(*args).ends.tolist() == [3, 70, 4]
    assert _plan(*args).ends.tolist() == [5, 195, 8]  # known values end with their block
