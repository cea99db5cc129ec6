"""The PyTorch fast paths agree with the references: chunked prefill == quadratic form == token recurrence
(any T, any start position, varlen, grouped heads), the decode step == its reference and touches only its
own slots, prefill + steps == one pass, and both match FLA's naive log-linear attention."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fenwick_llm.kernels import naive
from fenwick_llm.kernels.chunk_torch import chunk_log_linear_attn
from fenwick_llm.kernels.fused_recurrent_torch import fused_recurrent_step
from fenwick_llm.kernels.state import FenwickState, num_levels_for

from fenwick_llm import kernels

F64 = torch.float64


def _inputs(B: int, T: int, G: int, H: int, K: int, V: int, L: int, dtype: torch.dtype = F64,
            seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, G, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    g = -0.5 * torch.rand(B, T, H, generator=gen, dtype=F64)
    lam = torch.rand(B, T, H, L, generator=gen, dtype=F64) + 0.5
    return tuple(x.to(dtype) for x in (q, k, v, g, lam))


def _cut(xs: tuple[torch.Tensor, ...], a: int, b: int) -> tuple[torch.Tensor, ...]:
    return tuple(x[:, a:b] for x in xs)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _state_after(positions: list[int], G: int, H: int, K: int, V: int, L: int, seed: int) -> FenwickState:
    """A valid Fenwick state per sequence: the recurrence over a random prefix of the given length."""
    levels = []
    for i, p in enumerate(positions):
        xs = _inputs(1, p, G, H, K, V, L, seed=seed + i)
        _, st = naive.recurrent_log_linear_attn(*xs, output_final_state=True)
        levels.append(st.levels)
    return FenwickState(torch.cat(levels), torch.tensor(positions, dtype=torch.int64))


@pytest.mark.parametrize("T", [1, 7, 63, 64, 65, 200, 1000], ids=lambda t: f"T{t}")
def test_chunk_matches_quadratic_and_recurrence(T):
    xs = _inputs(2, T, 2, 4, 8, 4, num_levels_for(T))
    o_quad = naive.log_linear_attn(*xs)
    o_rec, st_rec = naive.recurrent_log_linear_attn(*xs, output_final_state=True)
    o, st = chunk_log_linear_attn(*xs, output_final_state=True)
    assert o.dtype == F64 and st.levels.dtype == F64
    assert _rel(o, o_quad) < 1e-12
    assert _rel(o, o_rec) < 1e-12
    assert torch.equal(st.positions, st_rec.positions)
    assert _rel(st.levels, st_rec.levels) < 1e-12


@pytest.mark.parametrize("G,H,L", [(1, 4, 9), (2, 6, 12), (3, 3, 15)], ids=["G1H4", "G2H6-L12", "G3H3-L15"])
def test_grouped_heads_and_spare_levels(G, H, L):
    xs = _inputs(1, 130, G, H, 8, 5, L, seed=1)
    o, st = chunk_log_linear_attn(*xs, output_final_state=True)
    assert _rel(o, naive.log_linear_attn(*xs)) < 1e-12
    assert st.levels.shape == (1, L, H, 8, 5)
    assert torch.count_nonzero(st.levels[:, num_levels_for(130):]) == 0  # levels no position reaches


@pytest.mark.parametrize("cut,T", [(1, 90), (37, 100), (64, 70), (100, 3), (127, 200), (128, 1)],
                         ids=lambda x: str(x))
def test_initial_state_at_any_position_equals_one_pass(cut, T):
    xs = _inputs(2, cut + T, 1, 2, 8, 4, num_levels_for(cut + T), seed=2)
    o_full, st_full = chunk_log_linear_attn(*xs, output_final_state=True)
    o1, st1 = chunk_log_linear_attn(*_cut(xs, 0, cut), output_final_state=True)
    o2, st2 = chunk_log_linear_attn(*_cut(xs, cut, cut + T), initial_state=st1, output_final_state=True)
    assert _rel(torch.cat([o1, o2], 1), o_full) < 1e-12
    assert torch.equal(st2.positions, torch.full((2,), cut + T))
    assert _rel(st2.levels, st_full.levels) < 1e-12
    _, st_rec = naive.recurrent_log_linear_attn(*xs, output_final_state=True)
    assert _rel(st2.levels, st_rec.levels) < 1e-12


def test_inputs_as_views_of_one_projection():
    """The mixer splits q, k, v, g, lambda out of one projection: strided views must work."""
    B, T, G, H, K, V, L = 2, 130, 2, 4, 8, 5, 9
    gen = torch.Generator().manual_seed(9)
    proj = torch.randn(B, T, 2 * G * K + H * V + H + H * L, generator=gen, dtype=F64)
    q, k, v, g, lam = proj.split([G * K, G * K, H * V, H, H * L], dim=-1)
    g.copy_(-g.abs())
    lam.copy_(lam.abs() + 0.5)
    xs = (q.view(B, T, G, K), k.view(B, T, G, K), v.view(B, T, H, V), g, lam.view(B, T, H, L))
    o, _ = chunk_log_linear_attn(*xs)
    assert _rel(o, naive.log_linear_attn(*xs)) < 1e-12
    pool = torch.zeros(3, L, H, K, V, dtype=F64)
    first = tuple(x[:, 0] for x in xs)
    o1 = fused_recurrent_step(*first, pool, torch.tensor([2, 0]), torch.zeros(2, dtype=torch.long))
    assert _rel(o1, o[:, 0]) < 1e-12


@pytest.mark.parametrize("C", [1, 2, 8], ids=lambda c: f"C{c}")
def test_small_chunks_exercise_the_block_tree(C):
    """Small chunks put most of a 200-token sequence into the cross-chunk tree, from an odd start."""
    xs = _inputs(1, 253, 1, 2, 4, 3, 9, seed=3)
    o_rec, st_rec = naive.recurrent_log_linear_attn(*xs, output_final_state=True)
    _, st1 = naive.recurrent_log_linear_attn(*_cut(xs, 0, 53), output_final_state=True)
    o, st = chunk_log_linear_attn(*_cut(xs, 53, 253), initial_state=st1, output_final_state=True,
                                  chunk_size=C)
    assert _rel(o, o_rec[:, 53:]) < 1e-12
    assert _rel(st.levels, st_rec.levels) < 1e-12


@pytest.mark.parametrize("with_state", [False, True], ids=["fresh", "continued"])
def test_varlen_equals_per_sequence_loop(with_state):
    G, H, K, V, L = 2, 4, 8, 5, 12
    lengths = [5, 0, 130, 64, 1, 77]
    starts = [0, 9, 37, 128, 300, 700] if with_state else [0] * 6
    xs = _inputs(1, sum(lengths), G, H, K, V, L, seed=4)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    init = _state_after(starts, G, H, K, V, L, seed=10) if with_state else None
    o, st = chunk_log_linear_attn(*xs, initial_state=init, output_final_state=True, cu_seqlens=cu)
    for n in range(len(lengths)):
        a, b = int(cu[n]), int(cu[n + 1])
        init_n = None if init is None else FenwickState(init.levels[n:n + 1], init.positions[n:n + 1])
        o_n, st_n = chunk_log_linear_attn(*_cut(xs, a, b), initial_state=init_n, output_final_state=True)
        if b > a:
            assert _rel(o[:, a:b], o_n) < 1e-12
        assert int(st.positions[n]) == starts[n] + lengths[n]
        assert _rel(st.levels[n:n + 1], st_n.levels) < 1e-12
    o_ref, st_ref = naive.recurrent_log_linear_attn(*xs, initial_state=init, output_final_state=True,
                                                    cu_seqlens=cu)
    assert _rel(o, o_ref) < 1e-12
    assert _rel(st.levels, st_ref.levels) < 1e-12


def _pool_case(state_dtype: torch.dtype, in_dtype: torch.dtype, untouched: str):
    G, H, K, V, L, P = 2, 4, 8, 5, 10, 12
    positions = [0, 1, 7, 8, 63, 64, 255, 300]  # 0, 1, 2^k - 1, 2^k, arbitrary
    slots = torch.tensor([3, 0, 11, 5, 1, 7, 2, 8])
    gen = torch.Generator().manual_seed(5)
    if untouched == "nan":
        pool = torch.full((P, L, H, K, V), float("nan"), dtype=state_dtype)
    else:
        pool = torch.randn(P, L, H, K, V, generator=gen).to(state_dtype)
    pool[slots] = _state_after(positions, G, H, K, V, L, seed=20).levels.to(state_dtype)
    N = len(positions)
    step = (torch.randn(N, G, K, generator=gen), torch.randn(N, G, K, generator=gen),
            torch.randn(N, H, V, generator=gen), -torch.rand(N, H, generator=gen),
            torch.rand(N, H, L, generator=gen) + 0.5)
    return tuple(x.to(in_dtype) for x in step), pool, slots, torch.tensor(positions)


# (state dtype, input dtype, tolerance on the output and the state against the reference)
STEP_DTYPES = [(F64, F64, 1e-12), (torch.float32, torch.float32, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
               (torch.float32, torch.float16, 1e-5), (torch.bfloat16, torch.float32, 1e-2),
               (torch.bfloat16, torch.bfloat16, 1e-2)]


@pytest.mark.parametrize("untouched", ["nan", "random"])
@pytest.mark.parametrize("state_dtype,in_dtype,tol", STEP_DTYPES,
                         ids=[f"{str(s)[6:]}-{str(i)[6:]}" for s, i, _ in STEP_DTYPES])
def test_step_matches_reference_and_leaves_other_slots(state_dtype, in_dtype, tol, untouched):
    step, pool, slots, positions = _pool_case(state_dtype, in_dtype, untouched)
    pool_ref, pool_new = pool.clone(), pool.clone()
    o_ref = naive.fused_recurrent_step_ref(*step, pool_ref, slots, positions)
    o = fused_recurrent_step(*step, pool_new, slots, positions.to(torch.int32))
    assert o.dtype == in_dtype and pool_new.dtype == state_dtype
    assert _rel(o, o_ref) < tol
    assert _rel(pool_new[slots], pool_ref[slots]) < tol
    others = torch.ones(pool.shape[0], dtype=torch.bool)
    others[slots] = False
    if untouched == "nan":
        assert pool_new[others].isnan().all()
    else:
        assert torch.equal(pool_new[others], pool[others])


@pytest.mark.parametrize("state_dtype,tol", [(F64, 1e-12), (torch.float32, 1e-5), (torch.bfloat16, 1e-2)],
                         ids=["f64", "f32", "bf16"])
def test_step_with_deferred_decay_matches_reference(state_dtype, tol):
    """Pools with deferred decay (level_decay): twelve steps from positions around powers of two, the
    read-outs and the levels they mean against the reference on plain levels; other slots untouched."""
    from fenwick_llm.kernels.state import true_levels
    from pools import deferred_pool
    G, H, K, V, L = 2, 4, 8, 4, 12
    positions = [0, 1, 6, 7, 63, 255, 1000]
    N, P = len(positions), len(positions) + 3
    slots = torch.randperm(P, generator=torch.Generator().manual_seed(1))[:N]
    start = _state_after(positions, G, H, K, V, L, seed=40)
    pos = torch.tensor(positions)
    pool, decay = deferred_pool(start.levels, pos, slots, P, state_dtype, seed=2)
    ref = start.levels.clone()
    xs = _inputs(N, 12, G, H, K, V, L, seed=3)
    for i in range(12):
        q, k, v, g, lam = (x[:, i] for x in xs)
        o_ref = naive.fused_recurrent_step_ref(q, k, v, g, lam, ref, torch.arange(N), pos + i)
        o = fused_recurrent_step(q, k, v, g, lam, pool, slots, pos + i, level_decay=decay)
        assert _rel(o, o_ref) < tol, i
    assert _rel(true_levels(pool, decay, slots, pos + 12, F64), ref) < tol
    others = torch.ones(P, dtype=torch.bool)
    others[slots] = False
    assert pool[others].isnan().all() and decay[others].isnan().all()


@pytest.mark.parametrize("t", [1, 2, 3, 6, 8, 96, 255, 256, 511, 600])
def test_step_level_blocks_counts_what_the_step_touches(t):
    """kernels.state.step_level_blocks (the benches' byte counts) against the deferred-decay step: poison
    every block it does not count as read (the output stays finite), count the blocks that change."""
    from fenwick_llm.kernels.state import step_level_blocks
    G, H, K, V, L = 1, 2, 4, 4, 11
    start = _state_after([t], G, H, K, V, L, seed=t)
    live = start.levels[0].abs().flatten(1).sum(-1) > 0  # (L,): levels S holds at position t
    pool = start.levels.clone()
    decay = torch.where(live, 0.0, float("-inf"))[None, None, :, None].expand(1, 2, L, H).contiguous()
    pool[0, ~live] = float("nan")  # an empty level is never read
    before = pool.clone()
    q, k, v, g, lam = (x[:, 0] for x in _inputs(1, 1, G, H, K, V, L, seed=1000))
    o = fused_recurrent_step(q, k, v, g, lam, pool, torch.tensor([0]), torch.tensor([t]), level_decay=decay)
    reads, writes = step_level_blocks(t)
    after, before = pool[0].nan_to_num(7.0), before[0].nan_to_num(7.0)
    changed = [lv for lv in range(L) if not torch.equal(after[lv], before[lv])]
    assert torch.isfinite(o).all() and int(live.sum()) == reads and len(changed) == writes
    in_place = start.levels.clone()  # the in-place step also rewrites the live levels and zeroes 1..z
    fused_recurrent_step(q, k, v, g, lam, in_place, torch.tensor([0]), torch.tensor([t]))
    changed = [lv for lv in range(L) if not torch.equal(in_place[0, lv], start.levels[0, lv])]
    assert len(changed) == sum(step_level_blocks(t, deferred=False)) - reads


def test_step_on_a_strided_pool():
    step, pool, slots, positions = _pool_case(torch.float32, torch.float32, "random")
    wide = torch.zeros(*pool.shape[:-1], 2 * pool.shape[-1])
    view = wide[..., ::2]
    view.copy_(pool)
    o_ref = naive.fused_recurrent_step_ref(*step, pool, slots, positions)
    o = fused_recurrent_step(*step, view, slots, positions)
    assert _rel(o, o_ref) < 1e-5
    assert _rel(view, pool) < 1e-6


@pytest.mark.parametrize("T,steps", [(0, 5), (61, 6), (64, 3), (100, 28)], ids=lambda x: str(x))
def test_prefill_then_steps_equals_one_pass(T, steps):
    G, H, K, V, L = 1, 2, 8, 4, 9
    xs = _inputs(2, T + steps, G, H, K, V, L, seed=6)
    o_full, st_full = chunk_log_linear_attn(*xs, output_final_state=True)
    o_pre, st = chunk_log_linear_attn(*_cut(xs, 0, T), output_final_state=True)
    pool = torch.full((4, L, H, K, V), float("nan"), dtype=F64)
    slots = torch.tensor([2, 0])
    pool[slots] = st.levels
    outs = [o_pre]
    for t in range(T, T + steps):
        q, k, v, g, lam = (x[:, t] for x in xs)
        outs.append(fused_recurrent_step(q, k, v, g, lam, pool, slots, torch.full((2,), t))[:, None])
    assert _rel(torch.cat(outs, 1), o_full) < 1e-12
    assert _rel(pool[slots], st_full.levels) < 1e-12
    assert pool[[1, 3]].isnan().all()


# (input dtype, tolerance against the float64 quadratic form of the same rounded inputs)
PREC = [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 2e-2)]


@pytest.mark.parametrize("dtype,tol", PREC, ids=[str(d)[6:] for d, _ in PREC])
def test_low_precision_inputs(dtype, tol):
    xs = _inputs(1, 300, 1, 4, 16, 8, 10, dtype=dtype, seed=7)
    init = _state_after([77], 1, 4, 16, 8, 10, seed=30)
    exact = naive.log_linear_attn(*(x.double() for x in xs))
    o, st = chunk_log_linear_attn(*xs, output_final_state=True)
    assert o.dtype == dtype and st.levels.dtype == torch.float32
    assert _rel(o, exact) < tol
    _, st_rec = naive.recurrent_log_linear_attn(*(x.double() for x in xs), output_final_state=True)
    assert _rel(st.levels, st_rec.levels) < 1e-5
    o2, _ = chunk_log_linear_attn(*xs, initial_state=FenwickState(init.levels.float(), init.positions))
    o2_ref, _ = naive.recurrent_log_linear_attn(*(x.double() for x in xs), initial_state=init)
    assert _rel(o2, o2_ref) < tol


def _fla_naive():
    """FLA's reference file alone: importing the ``fla`` package pulls in its models and transformers."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("flash-linear-attention is not installed")
    path = Path(spec.submodule_search_locations[0]) / "ops" / "log_linear_attn" / "naive.py"
    mod_spec = importlib.util.spec_from_file_location("fla_log_linear_naive", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("G,H,T", [(1, 2, 100), (2, 4, 129)], ids=["G1H2-T100", "G2H4-T129"])
def test_matches_fla_naive(G, H, T):
    fla_naive = _fla_naive()
    xs = _inputs(2, T, G, H, 8, 4, num_levels_for(T), seed=8)
    o_fla = fla_naive.naive_log_linear_attn(*xs, scale=None)
    o, _ = chunk_log_linear_attn(*xs)
    assert _rel(o, o_fla) < 1e-12
    q, k, v, g, lam = xs
    o_step = torch.empty_like(v)
    pool = torch.zeros(2, lam.shape[-1], H, 8, 4, dtype=F64)
    for t in range(T):
        o_step[:, t] = kernels.fused_recurrent_step(q[:, t], k[:, t], v[:, t], g[:, t], lam[:, t], pool,
                                                    torch.arange(2), torch.full((2,), t))
    assert _rel(o_step, o_fla) < 1e-12


def test_positions_beyond_the_levels_are_an_error():
    xs = _inputs(1, 5, 1, 1, 2, 2, 4)  # 4 levels hold 8 positions
    init = FenwickState(torch.zeros(1, 4, 1, 2, 2, dtype=F64), torch.tensor([4]))
    with pytest.raises(ValueError, match="levels"):
        chunk_log_linear_attn(*xs, initial_state=init)
    chunk_log_linear_attn(*_cut(xs, 0, 4), initial_state=init)  # exactly 8 is fine
    q, k, v, g, lam = (x[:, 0] for x in xs)
    pool = torch.zeros(2, 4, 1, 2, 2, dtype=F64)
    with pytest.raises(ValueError, match="levels"):
        fused_recurrent_step(q, k, v, g, lam, pool, torch.tensor([0]), torch.tensor([8]))
    with pytest.raises(ValueError):
        chunk_log_linear_attn(*xs, cu_seqlens=torch.tensor([0, 3]))
    with pytest.raises(ValueError):
        chunk_log_linear_attn(*xs[:4], xs[4][..., :3])


def test_cpu_routing_is_the_torch_path_and_import_is_lazy():
    xs = _inputs(1, 70, 1, 2, 4, 3, 8, dtype=torch.float32)
    o, _ = kernels.chunk_log_linear_attn(*xs)
    assert torch.equal(o, chunk_log_linear_attn(*xs)[0])
    code = ("import sys, fenwick_llm.kernels\n"
            "assert 'triton' not in sys.modules and 'fenwick_llm.kernels.chunk' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)


def test_kernels_import_and_dispatch_without_triton():
    """Where triton cannot be imported, the package imports and every op takes its reference."""
    code = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError
import torch
from fenwick_llm import kernels
from fenwick_llm.kernels import gemv_torch, norm_torch
assert not kernels.has_triton()
x, w, r = torch.randn(3, 8), torch.randn(6, 8), torch.randn(3, 6)
assert torch.equal(kernels.silu_mul(x), norm_torch.silu_mul_ref(x))
assert torch.equal(kernels.linear_residual(x, w, r), gemv_torch.linear_residual_ref(x, w, r))
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent)
