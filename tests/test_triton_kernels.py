"""Triton kernels against the PyTorch references.

CPU: the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (this file run as a script), so
the interpreter's setting never leaks into other test modules; small shapes and small chunks so that
several chunk levels, Fenwick folds and partial chunks show up. GPU (``gpu`` marker): realistic
shapes, per-dtype tolerances, NaN-poisoned memory, long sequences checked row by row in fp64.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from interpreted import DT_ID, run_interpreted

ROOT = Path(__file__).resolve().parents[1]


def _inputs(B, T, G, H, K, V, L, dtype=torch.float32, seed=0, device="cpu", gmax=0.1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G, K, generator=gen)
    k = torch.randn(B, T, G, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    g = -torch.rand(B, T, H, generator=gen) * gmax
    lam = torch.rand(B, T, H, L, generator=gen) + 0.5
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)] + [g.to(device), lam.to(device)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _states(starts, G, H, K, V, L, seed=100, device="cpu"):
    """Valid Fenwick states after random prefixes of the given lengths (fp64 reference)."""
    from fenwick_llm.kernels import naive
    out = []
    for i, s in enumerate(starts):
        if s == 0:
            out.append(torch.zeros(1, L, H, K, V, dtype=torch.float64, device=device))
            continue
        p = [x.double() for x in _inputs(1, s, G, H, K, V, L, seed=seed + i, device=device)]
        out.append(naive.recurrent_log_linear_attn(*p, output_final_state=True)[1].levels)
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# CPU: interpreter cases, run in a subprocess


CHUNK_CASES = {  # name -> shapes of _case_chunk: odd T, GQA, varlen, states at odd positions, folds, bf16
    "dense_odd_T": dict(lens=[77, 77], dense=True),
    "dense_gqa_init_odd": dict(lens=[50, 50], starts=[3, 21], G=2, H=4, dense=True),
    "varlen_init": dict(lens=[5, 0, 70, 37], starts=[0, 3, 17, 64], L=8),
    "varlen_fold_from_zero": dict(lens=[130, 9], chunk_size=16, direct_levels=1, V=24),
    "init_aligned_deep": dict(lens=[40], starts=[96], L=9, dense=True, direct_levels=0),
    "bf16": dict(lens=[40, 40], starts=[5, 0], dtype=torch.bfloat16, dense=True),
    "varlen_init_many_levels": dict(lens=[100, 40, 1], starts=[21, 300, 7], L=10),
    "v_tiles": dict(lens=[130, 9], starts=[3, 0], chunk_size=16, direct_levels=1, V=80),  # V in 64 + 16
}


def _case_chunk(name, *, lens, starts=None, G=1, H=2, K=16, V=16, L=9, dtype=torch.float32, dense=False,
                chunk_size=16, direct_levels=1, seed=0):
    """The Triton prefill against the fp64 recurrence."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    from fenwick_llm.kernels.state import FenwickState
    N, T = len(lens), sum(lens)
    if dense:
        q, k, v, g, lam = _inputs(N, lens[0], G, H, K, V, L, dtype=dtype, seed=seed)
        cu = None
    else:
        q, k, v, g, lam = _inputs(1, T, G, H, K, V, L, dtype=dtype, seed=seed)
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    init = None
    if starts is not None:
        init = FenwickState(_states(starts, G, H, K, V, L).float(), torch.tensor(starts))
    ref_init = None if init is None else FenwickState(init.levels.double(), init.positions)
    ro, rst = naive.recurrent_log_linear_attn(*(x.double() for x in (q, k, v, g, lam)),
                                             initial_state=ref_init, output_final_state=True, cu_seqlens=cu)
    o, st = chunk_log_linear_attn_impl(q, k, v, g, lam, initial_state=init, output_final_state=True,
                                       cu_seqlens=cu, chunk_size=chunk_size, direct_levels=direct_levels)
    return {name: {"o": _rel(o, ro), "state": _rel(st.levels, rst.levels),
                   "positions": bool(torch.equal(st.positions, rst.positions))}}


def _case_step(name, *, positions, G=2, H=2, K=16, V=16, L=12, block_v=16, seed=1):
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    N = len(positions)
    pos = torch.tensor(positions)
    slots = torch.randperm(N + 3, generator=torch.Generator().manual_seed(seed))[:N]
    pool = torch.full((N + 3, L, H, K, V), float("nan"))
    pool[slots] = _states(positions, G, H, K, V, L, seed=seed * 1000).float()
    q, k, v, g, lam = (x[0] for x in _inputs(1, N, G, H, K, V, L, seed=seed, gmax=1.0))
    ref_pool = pool.double()
    ro = naive.fused_recurrent_step_ref(q.double(), k.double(), v.double(), g.double(), lam.double(),
                                        ref_pool, slots, pos)
    o = fused_recurrent_step(q, k, v, g, lam, pool, slots, pos, block_v=block_v)
    untouched = [i for i in range(N + 3) if i not in slots.tolist()]
    return {name: {"o": _rel(o, ro), "state": _rel(pool[slots], ref_pool[slots]),
                   "others_untouched": bool(torch.isnan(pool[untouched]).all())}}


def _case_step_deferred(name, *, positions, dtype=torch.float32, steps=3, G=2, H=2, K=16, V=16, L=12,
                        seed=5, block_v=None):
    """Steps on a pool with deferred decay (tests/pools.py) against the reference on plain levels; λ is
    a view of a wider tensor (the engine drops the λ of levels its pool cannot reach)."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    from fenwick_llm.kernels.state import true_levels
    from pools import deferred_pool
    N, P = len(positions), len(positions) + 3
    pos = torch.tensor(positions)
    slots = torch.randperm(P, generator=torch.Generator().manual_seed(seed))[:N]
    ref = _states(positions, G, H, K, V, L, seed=seed * 1000)
    pool, decay = deferred_pool(ref, pos, slots, P, dtype, seed=seed)
    xs = [x[0] for x in _inputs(1, N * steps, G, H, K, V, L, seed=seed, gmax=1.0)]
    worst = 0.0
    for i in range(steps):
        q, k, v, g, lam = (x[i * N:(i + 1) * N] for x in xs)
        o_ref = naive.fused_recurrent_step_ref(q.double(), k.double(), v.double(), g.double(), lam.double(),
                                               ref, torch.arange(N), pos + i)
        wide = torch.cat([lam, torch.full_like(lam[..., :3], float("nan"))], -1)  # λ of levels past L
        o = fused_recurrent_step(q, k, v, g, wide[..., :L], pool, slots, pos + i, level_decay=decay,
                                 block_v=block_v)
        worst = max(worst, _rel(o, o_ref))
    others = [i for i in range(P) if i not in slots.tolist()]
    state = true_levels(pool, decay, slots, pos + steps, torch.float64)
    untouched = torch.isnan(pool[others]).all() and torch.isnan(decay[others]).all()
    return {name: {"o": worst, "state": _rel(state, ref), "others_untouched": bool(untouched)}}


def _case_prefill_then_steps(name, *, T=45, steps=6, G=1, H=2, K=16, V=16, L=8):
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    q, k, v, g, lam = _inputs(1, T + steps, G, H, K, V, L, seed=7)
    full, st_full = chunk_log_linear_attn_impl(q, k, v, g, lam, output_final_state=True, chunk_size=16,
                                               direct_levels=1)
    part, st = chunk_log_linear_attn_impl(*(x[:, :T] for x in (q, k, v, g, lam)), output_final_state=True,
                                          chunk_size=16, direct_levels=1)
    pool = st.levels.clone()
    outs = [fused_recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t], pool, torch.tensor([0]),
                                 torch.tensor([t])) for t in range(T, T + steps)]
    return {name: {"o": _rel(torch.cat([part, torch.stack(outs, 1)], 1), full),
                   "state": _rel(pool, st_full.levels)}}


def _case_layers_share_plan(name, *, lens=(5, 70, 37), starts=(3, 17, 64), G=1, H=2, K=16, V=16, L=9):
    """Three "layers" over one plan built once (as model.run_prefill passes it), new q, k, v, g, λ each
    time; every layer against the recurrence."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    from fenwick_llm.kernels.chunk_plan import build_plan
    from fenwick_llm.kernels.state import FenwickState
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    pos = torch.tensor(starts)
    plan = build_plan(list(starts), list(lens), L, torch.device("cpu"), chunk_size=16, direct_levels=1)
    worst = {"o": 0.0, "state": 0.0}
    for layer in range(3):
        q, k, v, g, lam = _inputs(1, sum(lens), G, H, K, V, L, seed=layer)
        levels = _states(list(starts), G, H, K, V, L, seed=50 + 10 * layer)
        init = FenwickState(levels.float(), pos)
        o, st = chunk_log_linear_attn_impl(q, k, v, g, lam, initial_state=init, output_final_state=True,
                                           cu_seqlens=cu, chunk_size=16, direct_levels=1, plan=plan)
        ro, rst = naive.recurrent_log_linear_attn(*(x.double() for x in (q, k, v, g, lam)),
                                                 initial_state=FenwickState(levels, pos),
                                                 output_final_state=True, cu_seqlens=cu)
        worst["o"] = max(worst["o"], _rel(o, ro))
        worst["state"] = max(worst["state"], _rel(st.levels, rst.levels))
    return {name: worst}


def _case_padded_plan(name, *, lens=(5, 70, 37), starts=(3, 17, 64), pad_tokens=144, pad_seqs=6, G=1, H=2,
                      K=16, V=16, L=9):
    """A step padded as the engine pads it for a CUDA graph (engine/prefill_batch.py): a padding sequence
    of the spare tokens and empty ones, all into one dummy row, a plan at the bucket's capacity (spare
    chunks, fold slots of -1). The step's own sequences against the recurrence; the other rows kept."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    from fenwick_llm.kernels.chunk_plan import build_plan, chunk_capacity
    from fenwick_llm.kernels.state import FenwickState
    n, T = len(lens), sum(lens)
    all_lens = [*lens, pad_tokens - T] + [0] * (pad_seqs - n - 1)
    all_starts = [*starts] + [0] * (pad_seqs - n)
    cu = torch.tensor([0, *torch.tensor(all_lens).cumsum(0).tolist()])
    q, k, v, g, lam = _inputs(1, pad_tokens, G, H, K, V, L, seed=3)
    levels = _states(all_starts, G, H, K, V, L, seed=70)
    init = FenwickState(levels.float(), torch.tensor(all_starts))
    capacity = chunk_capacity(pad_tokens, pad_seqs, L, chunk_size=16, direct_levels=1)
    plan = build_plan(all_starts, all_lens, L, torch.device("cpu"), 16, 1, capacity)
    dummy = pad_seqs
    slots = torch.tensor([*range(n)] + [dummy] * (pad_seqs - n))
    pool = torch.full((pad_seqs + 2, L, H, K, V), float("nan"))
    o, _ = chunk_log_linear_attn_impl(q, k, v, g, lam, initial_state=init, cu_seqlens=cu, chunk_size=16,
                                      direct_levels=1, final_into=(pool, slots), plan=plan)
    own = slice(0, n)
    ro, rst = naive.recurrent_log_linear_attn(*(x[:, :T].double() for x in (q, k, v, g, lam)),
                                             initial_state=FenwickState(levels[own], init.positions[own]),
                                             output_final_state=True, cu_seqlens=cu[:n + 1])
    return {name: {"o": _rel(o[:, :T], ro), "state": _rel(pool[:n].double(), rst.levels),
                   "kept": bool(torch.isnan(pool[n:dummy]).all() and torch.isnan(pool[dummy + 1:]).all()),
                   "spare_chunks": capacity.chunks - int(plan.num_chunks.item())}}


def _case_final_into(name, *, lens=(5, 0, 70, 37), starts=(0, 3, 17, 64), G=1, H=2, K=16, V=16, L=9):
    """final_into=(pool, slots): the final levels land in pool[slots] in the pool's dtype, a sequence
    with no new token and the other rows keep what they held (NaN here). Also pools that hold only the
    top L - low levels (a windowed pool: low = 6; low = 3 splits the chunk's own levels 0..4)."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    from fenwick_llm.kernels.state import FenwickState
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    q, k, v, g, lam = _inputs(1, sum(lens), G, H, K, V, L, seed=3)
    levels = _states(list(starts), G, H, K, V, L, seed=70)
    init = FenwickState(levels.float(), torch.tensor(starts))
    _, rst = naive.recurrent_log_linear_attn(*(x.double() for x in (q, k, v, g, lam)),
                                             initial_state=FenwickState(levels, init.positions),
                                             output_final_state=True, cu_seqlens=cu)
    slots = torch.randperm(len(lens) + 3, generator=torch.Generator().manual_seed(4))[:len(lens)]
    moved = [n for n, m in enumerate(lens) if m]
    res = {}
    for dt, low in ((torch.float32, 0), (torch.bfloat16, 0), (torch.float32, 3), (torch.float32, 6)):
        pool = torch.full((len(lens) + 3, L - low, H, K, V), float("nan"), dtype=dt)
        o, st = chunk_log_linear_attn_impl(q, k, v, g, lam, initial_state=init, cu_seqlens=cu, chunk_size=16,
                                           direct_levels=1, final_into=(pool, slots))
        kept = [i for i in range(pool.shape[0]) if i not in slots[moved].tolist()]
        key = f"{name}/{DT_ID[dt]}" + (f"/low{low}" if low else "")
        res[key] = {"state": _rel(pool[slots[moved]].double(), rst.levels[moved, low:]),
                    "kept": bool(torch.isnan(pool[kept]).all()), "none": st is None}
    return res


def _interpret_cases() -> dict:
    res = {}
    res.update(_case_final_into("final_into"))
    res.update(_case_layers_share_plan("layers_share_plan"))
    res.update(_case_padded_plan("padded_plan"))
    for name, shapes in CHUNK_CASES.items():
        res.update(_case_chunk(name, **shapes))
    res.update(_case_step("step_edges", positions=[0, 1, 7, 8, 15, 16, 255, 1000]))
    res.update(_case_step("step_wide_block", positions=[3, 64, 127], block_v=32, V=24, seed=2))
    res.update(_case_prefill_then_steps("prefill_then_steps"))
    edges = [0, 1, 6, 7, 8, 255, 1000]
    res.update(_case_step_deferred("step_deferred", positions=edges))
    res.update(_case_step_deferred("step_deferred_v_tiles", positions=edges, V=40, block_v=16))
    res.update(_case_step_deferred("step_deferred_bf16", positions=edges, dtype=torch.bfloat16))
    return res


@pytest.fixture(scope="module")
def interpret_results() -> dict:
    return run_interpreted(__file__, timeout=600)


TOL = {"bf16": 2e-2}


@pytest.mark.parametrize("case", list(CHUNK_CASES))
def test_chunk_interpreted_matches_recurrence(interpret_results, case):
    r = interpret_results[case]
    tol = TOL.get(case, 1e-5)
    assert r["o"] < tol and r["state"] < tol and r["positions"], r


@pytest.mark.parametrize("case", ["step_edges", "step_wide_block"])
def test_step_interpreted_matches_reference(interpret_results, case):
    r = interpret_results[case]
    assert r["o"] < 1e-5 and r["state"] < 1e-5 and r["others_untouched"], r


@pytest.mark.parametrize("dt", ["fp32", "bf16", "fp32/low3", "fp32/low6"])
def test_chunk_final_into_pool_interpreted(interpret_results, dt):
    r = interpret_results[f"final_into/{dt}"]
    assert r["state"] < {"bf16": 1e-2}.get(dt, 1e-5) and r["kept"] and r["none"], r


@pytest.mark.parametrize("case,tol", [("step_deferred", 1e-5), ("step_deferred_v_tiles", 1e-5),
                                      ("step_deferred_bf16", 1e-2)])
def test_step_with_deferred_decay_interpreted(interpret_results, case, tol):
    r = interpret_results[case]
    assert r["o"] < tol and r["state"] < tol and r["others_untouched"], r


def test_layers_sharing_one_plan_interpreted(interpret_results):
    r = interpret_results["layers_share_plan"]
    assert r["o"] < 1e-5 and r["state"] < 1e-5, r


def test_padded_plan_interpreted(interpret_results):
    r = interpret_results["padded_plan"]
    assert r["o"] < 1e-5 and r["state"] < 1e-5 and r["kept"] and r["spare_chunks"] > 0, r


def test_prefill_then_steps_interpreted(interpret_results):
    r = interpret_results["prefill_then_steps"]
    assert r["o"] < 1e-5 and r["state"] < 1e-5, r


# ----------------------------------------------------------------------------------------------
# GPU: realistic shapes

GPU_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 5e-3, torch.float32: 1e-4}


def _poison_cuda(nbytes: int = 8 << 30) -> None:
    """Fill cached allocator blocks with NaN so that unwritten outputs show."""
    x = torch.full((nbytes // 4,), float("nan"), device="cuda")
    del x


def _bitlen(x: torch.Tensor) -> torch.Tensor:
    """Integer bitlen of int64 tensors (no float log2, whose rounding differs between devices)."""
    n = torch.zeros_like(x)
    for b in range(int(x.max()).bit_length()):
        n += (x >> b) > 0
    return n


def _rows_reference(q, k, v, g, lam, rows, scale, start=0):
    """fp64 quadratic form for selected rows of one sequence starting at position ``start``."""
    _, T, G, K = q.shape
    H = v.shape[2]
    rep = H // G
    Gc = g[0].double().cumsum(0)  # (T, H)
    out = []
    for t in rows:
        s = torch.arange(t + 1, device=q.device)
        lvl = _bitlen((start + t) ^ (start + s))  # (t+1,)
        lam_ts = lam[0, t].double()[:, lvl].T  # (t+1, H)
        dec = (Gc[t][None, :] - Gc[: t + 1]).exp()  # (t+1, H)
        sc = torch.einsum("sgk,gk->sg", k[0, : t + 1].double(), q[0, t].double())
        sc = sc.repeat_interleave(rep, dim=1)  # (t+1, H)
        out.append(torch.einsum("sh,shv->hv", sc * dec * lam_ts, v[0, : t + 1].double()) * scale)
    return torch.stack(out)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=DT_ID.get)
def test_chunk_gpu_matches_quadratic(dtype):
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn
    q, k, v, g, lam = _inputs(2, 1000, 1, 32, 128, 64, 15, dtype=dtype, device="cuda")
    _poison_cuda()
    o, st = chunk_log_linear_attn(q, k, v, g, lam, output_final_state=True)
    ref = naive.log_linear_attn(*(x.double().cpu() for x in (q, k, v, g, lam)))  # CPU: exact level matrix
    assert _rel(o.cpu(), ref) < GPU_TOL[dtype]
    _, rst = naive.recurrent_log_linear_attn(*(x.double() for x in (q, k, v, g, lam)),
                                             output_final_state=True)
    assert _rel(st.levels, rst.levels) < GPU_TOL[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("V", [128, 200])
def test_chunk_gpu_wide_heads_match_quadratic(V):
    """V wider than one tile (2 and 4 tiles of 64, the last partial at 200): every tile's programs see
    the same folded nodes (direct_levels 1: the fold kernel runs at 1000 tokens in 16-token chunks)."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    q, k, v, g, lam = _inputs(2, 1000, 1, 4, 128, V, 15, dtype=torch.float32, device="cuda")
    _poison_cuda()
    o, st = chunk_log_linear_attn_impl(q, k, v, g, lam, output_final_state=True, chunk_size=16,
                                       direct_levels=1)
    ref = naive.log_linear_attn(*(x.double().cpu() for x in (q, k, v, g, lam)))
    assert _rel(o.cpu(), ref) < GPU_TOL[torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("T,H,L", [(65536, 32, 17), (1 << 20, 2, 21)], ids=["64K", "1M"])
def test_chunk_gpu_long_rows_and_split(T, H, L):
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn
    from fenwick_llm.kernels.state import FenwickState
    q, k, v, g, lam = _inputs(1, T, 1, H, 128, 64, L, dtype=torch.bfloat16, device="cuda", gmax=0.002)
    _poison_cuda()
    o, st = chunk_log_linear_attn(q, k, v, g, lam, output_final_state=True)
    rows = sorted({0, 63, 64, 4095, 4096, 40001, T // 2 - 1, T - 2, T - 1} |
                  set(torch.randint(0, T, (8,), generator=torch.Generator().manual_seed(0)).tolist()))
    ref = _rows_reference(q, k, v, g, lam, rows, 128 ** -0.5)
    assert _rel(o[0, rows], ref) < GPU_TOL[torch.bfloat16]
    cut = 40001
    o1, s1 = chunk_log_linear_attn(*(x[:, :cut] for x in (q, k, v, g, lam)), output_final_state=True)
    o2, s2 = chunk_log_linear_attn(*(x[:, cut:] for x in (q, k, v, g, lam)),
                                   initial_state=FenwickState(s1.levels, s1.positions),
                                   output_final_state=True)
    assert _rel(torch.cat([o1, o2], 1), o) < 1e-2
    assert _rel(s2.levels, st.levels) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
def test_step_gpu_with_deferred_decay_matches_reference(dtype):
    """The engine's pool layout (level_decay) at the engine's shapes: three steps from edge positions."""
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    from fenwick_llm.kernels.state import true_levels
    from pools import deferred_pool
    H, K, V, L = 24, 128, 64, 15
    positions = [0, 1, 2, 3, 62, 63, 64, 1023, 1024, 4094, 8191, 16381, 5000, 9999, 777]
    N, P = len(positions), 40
    gen = torch.Generator(device="cuda").manual_seed(1)
    slots = torch.randperm(P, device="cuda", generator=gen)[:N]
    ref = 0.1 * torch.randn(N, L, H, K, V, device="cuda", generator=gen, dtype=torch.float64)
    for i, s in enumerate(positions):
        for lv in range(L):
            if not ((lv == 0 and s > 0) or (lv > 0 and ((s - 1) >> (lv - 1)) & 1 and s > 0)):
                ref[i, lv] = 0
    pos = torch.tensor(positions, device="cuda")
    pool, decay = deferred_pool(ref, pos, slots, P, dtype, seed=3)
    xs = [x[0] for x in _inputs(1, 3 * N, 1, H, K, V, L, device="cuda", gmax=1.0)]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i in range(3):
        q, k, v, g, lam = (x[i * N:(i + 1) * N] for x in xs)
        ro = naive.fused_recurrent_step_ref(q.double(), k.double(), v.double(), g.double(), lam.double(),
                                            ref, torch.arange(N, device="cuda"), pos + i)
        o = fused_recurrent_step(q, k, v, g, lam, pool, slots, pos + i, level_decay=decay)
        assert _rel(o, ro) < tol, i
    assert _rel(true_levels(pool, decay, slots, pos + 3, torch.float64), ref) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("N", [16, 256])  # one program per (head, V tile) at N * H below / above 128
def test_step_gpu_matches_reference_at_edge_positions(N):
    from fenwick_llm.kernels import naive
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    H, K, V, L = 32, 128, 64, 15
    edges = [0, 1, 2, 3, 63, 64, 1023, 1024, 4095, 4096, 8191, 16383, 5000, 9999, 12345, 777]
    positions = (edges * (N // len(edges)))[:N]
    P = N + 24
    gen = torch.Generator(device="cuda").manual_seed(0)
    slots = torch.randperm(P, device="cuda", generator=gen)[:N]
    pool = torch.randn(P, L, H, K, V, device="cuda", generator=gen)
    for i, s in enumerate(positions):
        for lv in range(L):
            live = (lv == 0 and s > 0) or (lv > 0 and ((s - 1) >> (lv - 1)) & 1 and s > 0)
            if not live:
                pool[slots[i], lv] = 0
    q, k, v, g, lam = (x[0] for x in _inputs(1, N, 1, H, K, V, L, device="cuda", gmax=1.0))
    pos = torch.tensor(positions, device="cuda")
    ref_pool = pool.double()
    ro = naive.fused_recurrent_step_ref(q.double(), k.double(), v.double(), g.double(), lam.double(),
                                        ref_pool, slots, pos)
    _poison_cuda()
    o = fused_recurrent_step(q, k, v, g, lam, pool, slots, pos)
    assert _rel(o, ro) < 1e-5
    assert _rel(pool, ref_pool) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=DT_ID.get)
def test_gpu_prefill_then_steps_equals_longer_prefill(dtype):
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    T, steps, H, K, V, L = 4000, 100, 32, 128, 64, 15
    q, k, v, g, lam = _inputs(2, T + steps, 1, H, K, V, L, dtype=dtype, device="cuda")
    full, st_full = chunk_log_linear_attn(q, k, v, g, lam, output_final_state=True)
    part, st = chunk_log_linear_attn(*(x[:, :T] for x in (q, k, v, g, lam)), output_final_state=True)
    pool = torch.cat([torch.zeros_like(st.levels), st.levels])  # sequences in slots 2, 3
    slots = torch.tensor([2, 3], device="cuda")
    outs = []
    graph_pos = torch.zeros(2, dtype=torch.int64, device="cuda")
    for t in range(T, T + steps):
        graph_pos.fill_(t)
        step = fused_recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t], pool, slots, graph_pos)
        outs.append(step)
    tol = GPU_TOL[dtype]
    assert _rel(torch.stack(outs, 1), full[:, T:]) < tol
    assert _rel(part, full[:, :T]) < tol
    assert _rel(pool[2:], st_full.levels) < tol


# fp32 packed sequences from initial states, last: at K = 128 these fp32 kernels are FMA products
# with a large stack, and their compile did not finish inside 150-200 s on the H200 (docs/kernels-notes.md)

@pytest.mark.gpu
def test_chunk_gpu_varlen_with_state_matches_per_sequence():
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn
    from fenwick_llm.kernels.state import FenwickState
    lens, starts = [1, 700, 64, 2049, 333], [0, 5, 4096, 1023, 9000]
    H, K, V, L = 32, 128, 64, 15
    q, k, v, g, lam = _inputs(1, sum(lens), 1, H, K, V, L, dtype=torch.float32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    init = FenwickState(torch.randn(len(lens), L, H, K, V, device="cuda", generator=gen),
                        torch.tensor(starts, device="cuda"))
    for i, s in enumerate(starts):  # zero the levels that are empty after s tokens
        for lv in range(L):
            if s == 0 or (lv > 0 and not ((s - 1) >> (lv - 1)) & 1):
                init.levels[i, lv] = 0
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device="cuda")
    _poison_cuda()
    o, st = chunk_log_linear_attn(q, k, v, g, lam, initial_state=init, output_final_state=True, cu_seqlens=cu)
    for i in range(len(lens)):
        a, b = cu[i].item(), cu[i + 1].item()
        one = FenwickState(init.levels[i:i + 1], init.positions[i:i + 1])
        oi, sti = chunk_log_linear_attn(*(x[:, a:b] for x in (q, k, v, g, lam)), initial_state=one,
                                        output_final_state=True)
        assert _rel(o[:, a:b], oi) < 1e-6
        assert _rel(st.levels[i:i + 1], sti.levels) < 1e-6
    assert st.positions.tolist() == [s + n for s, n in zip(starts, lens, strict=True)]


if __name__ == "__main__":
    print(json.dumps(_interpret_cases()))
