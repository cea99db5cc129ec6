"""The Triton decode step (kernels/fused_recurrent.py) against the fp64 reference, in place on a pool
(no deferred decay: the op's contract in DESIGN §4), under TRITON_INTERPRET=1 in a subprocess (this
file as a script), like tests/test_triton_kernels.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from interpreted import run_interpreted

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # positions, (G, H, K, V, L), kwargs of fused_recurrent_step
    "edges": ([0, 1, 7, 8, 15, 16, 255, 1000], (2, 2, 16, 16, 12), dict(block_v=16)),
    "v_tiles": ([3, 64, 127, 2047], (1, 3, 16, 40, 12), dict(block_v=16)),  # 3 tiles, the last partial
    "default_tiles": ([2, 9, 33], (1, 2, 16, 16, 10), {}),
    "bf16_pool": ([1, 6, 64, 300], (1, 2, 16, 16, 10), dict(pool_dtype=torch.bfloat16)),
}
TOL = {"bf16_pool": 1e-2}  # the pool rounds every written level to bf16


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
    untouched = [i for i in range(N + 3) if i not in slots.tolist()]
    return {"o": _rel(o, ro), "state": _rel(pool[slots], ref_pool[slots]),
            "others_untouched": bool(torch.isnan(pool[untouched]).all())}


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_reference(results, case):
    r = results[case]
    tol = TOL.get(case, 1e-5)
    assert r["o"] < tol and r["state"] < tol and r["others_untouched"], r


if __name__ == "__main__":
    print(json.dumps({name: _run_case(*args) for name, args in CASES.items()}))
