"""A prefill's initial state read from the engine's pool (kernels/pool_torch.py, kernels/pool_triton.py):
the pooled levels equal the recurrence's S, the merged form equals S merged for the first query, and the
one-launch Triton kernel equals the reference (interpreter on the CPU, and on a GPU)."""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.kernels.pool_torch import merge_for_query, merged_levels_ref, pooled_levels
from fenwick_llm.kernels.state import PooledState
from pools import deferred_pool
from test_kernels_torch import _inputs
from test_window import STARTS, _windowed_pool

F64 = torch.float64


def _expected_merge(S: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """merge_for_query written out per sequence."""
    out = S.clone()
    L = S.shape[1]
    for n, t in enumerate(positions):
        if t == 0:
            continue
        z = (t & -t).bit_length() - 1
        carry = S[n, :z + 1].sum(0)
        out[n, :z + 1] = 0
        out[n, min(z + 1, L - 1)] += carry if z + 1 < L else carry - S[n, L - 1]
    return out


def _windowed_case(dtype: torch.dtype, G: int = 1, H: int = 2, K: int = 8, V: int = 4, L: int = 9):
    N, P = len(STARTS), len(STARTS) + 3
    xs = _inputs(N, max(STARTS) + 1, G, H, K, V, L, seed=3)
    slots = torch.randperm(P, generator=torch.Generator().manual_seed(4))[:N]
    levels, decay, window, S = _windowed_pool(STARTS, xs, P, slots, L, dtype)
    return PooledState(levels, decay, slots, torch.tensor(STARTS), window), S


def _deferred_case(dtype: torch.dtype, H: int = 2, K: int = 8, V: int = 4, L: int = 4):
    """Random levels S (empty where the position has no such level), stored unevenly; position 8 carries
    past the top level (ctz = L - 1)."""
    positions = [0, 1, 2, 3, 5, 6, 7, 8]
    N, P = len(positions), len(positions) + 2
    gen = torch.Generator().manual_seed(5)
    S = torch.randn(N, L, H, K, V, generator=gen, dtype=F64)
    for n, t in enumerate(positions):
        for lev in range(1, L):  # level l >= 1 is live iff bit l - 1 of t is set
            if not (t >> (lev - 1)) & 1:
                S[n, lev] = 0
        if t == 0:
            S[n, 0] = 0
    slots = torch.randperm(P, generator=gen)[:N]
    pos = torch.tensor(positions)
    pool, decay = deferred_pool(S, pos, slots, P, dtype)
    return PooledState(pool, decay, slots, pos), S


@pytest.mark.parametrize("case", ["window", "deferred"])
def test_pooled_levels_and_merge_match_the_state(case: str) -> None:
    state, S = (_windowed_case if case == "window" else _deferred_case)(F64)
    got = pooled_levels(state, F64)
    assert torch.allclose(got, S, rtol=1e-10, atol=1e-12)
    merged = merge_for_query(got, state.positions)
    assert torch.allclose(merged, _expected_merge(S, state.positions.tolist()), rtol=1e-10, atol=1e-12)
    m, cm = merged_levels_ref(state)
    assert torch.allclose(cm.double(), m.double().cumsum(1), rtol=1e-6, atol=1e-6)


def _triton_case() -> dict:
    """Interpreter run (TRITON_INTERPRET=1, in a subprocess): the one-launch kernel against the
    reference on the windowed and the deferred pools, fp32 and bf16 storage."""
    from fenwick_llm.kernels.pool_triton import pooled_merged_levels
    out = {}
    for name, make in (("window", _windowed_case), ("deferred", _deferred_case)):
        for dtype in (torch.float32, torch.bfloat16):
            state, _ = make(dtype)
            m_ref, cm_ref = merged_levels_ref(state)
            m, cm = pooled_merged_levels(state)
            err = max(((m - m_ref).abs().max() / m_ref.abs().max()).item(),
                      ((cm - cm_ref).abs().max() / cm_ref.abs().max()).item())
            out[f"{name}-{str(dtype)[6:]}"] = err
    return out


def _write_case(device: str = "cpu", G: int = 1, H: int = 3, K: int = 8, V: int = 4) -> dict:
    """The window writer (Triton) against its reference after one packed prefill: sequences that start a
    block, continue one mid-block (gc from the row before), span several blocks or add a single token.
    Rows the call must not write hold random values before it; returns the largest difference per window
    tensor: k and v rows must be equal, gc (index 2) equal up to the order of its float32 sums."""
    from fenwick_llm.kernels.state import W, window_rows
    from fenwick_llm.kernels.window_torch import write_window_ref
    from fenwick_llm.kernels.window_triton import write_window_triton
    starts, lens = [0, 3, 30, 64, 100, 31, 7], [5, 40, 2, 33, 28, 1, 1]
    P, T = len(starts) + 2, sum(lens)
    gen = torch.Generator().manual_seed(6)
    win = [torch.randn(P, 2, W, G, K, generator=gen), torch.randn(P, 2, W, H, V, generator=gen),
           torch.randn(P, 2, W, H, generator=gen)]
    win = [w.to(device) for w in win]
    k, v = torch.randn(T, G, K, generator=gen).to(device), torch.randn(T, H, V, generator=gen).to(device)
    g = (-torch.rand(T, H, generator=gen)).to(device)
    slots = torch.randperm(P, generator=gen)[:len(starts)].to(device)
    outs = []
    for dtype, fn in ((torch.float32, write_window_ref), (torch.float32, write_window_triton),
                      (torch.bfloat16, write_window_ref), (torch.bfloat16, write_window_triton)):
        w = (win[0].to(dtype), win[1].to(dtype), win[2].clone())
        fn(w, window_rows(starts, lens, slots), k, v, g)
        outs.append(w)
    return {f"{name}-{i}": (a[i].float() - b[i].float()).abs().max().item()
            for name, (a, b) in (("fp32", outs[:2]), ("bf16", outs[2:])) for i in range(3)}


def test_pooled_merged_levels_triton_interpreted() -> None:
    from interpreted import run_interpreted
    r = run_interpreted(__file__, timeout=600)
    merged = {key: err for key, err in r.items() if key.split("-")[0] in ("window", "deferred")}
    written = {key: err for key, err in r.items() if key not in merged}
    assert len(merged) == 4 and all(err < 1e-5 for err in merged.values()), r
    assert len(written) == 6 and all(err < (1e-5 if key.endswith("2") else 0.0) or err == 0.0
                                     for key, err in written.items()), r


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", ["window", "deferred"])
def test_pooled_merged_levels_gpu(case: str, dtype: torch.dtype) -> None:
    """Engine shapes (24 heads, K 128, V 64) on CUDA: the kernel against the reference."""
    from fenwick_llm.kernels.pool_triton import pooled_merged_levels
    if case == "window":
        state, _ = _windowed_case(dtype, G=1, H=24, K=128, V=64, L=11)
    else:
        state, _ = _deferred_case(dtype, H=24, K=128, V=64, L=11)
    dev = torch.device("cuda")
    state = PooledState(state.levels.to(dev), state.decay.to(dev), state.slots.to(dev),
                        state.positions.to(dev), None if state.window is None
                        else tuple(w.to(dev) for w in state.window))
    m_ref, cm_ref = merged_levels_ref(state)
    m, cm = pooled_merged_levels(state)
    assert ((m - m_ref).abs().max() / m_ref.abs().max()).item() < 1e-5
    assert ((cm - cm_ref).abs().max() / cm_ref.abs().max()).item() < 1e-5


@pytest.mark.gpu
def test_write_window_gpu() -> None:
    """The window writer at engine shapes on CUDA: the same writes as the reference."""
    r = _write_case("cuda", G=1, H=24, K=128, V=64)
    assert all(err == 0.0 or (key.endswith("2") and err < 1e-5) for key, err in r.items()), r


if __name__ == "__main__":
    import json

    from interpreted import round_bf16_to_nearest_even
    round_bf16_to_nearest_even()  # the window rows are cast to bf16 as the GPU does
    print(json.dumps({**_triton_case(), **_write_case()}))
