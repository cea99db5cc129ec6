"""The two reference forms agree: quadratic (parallel) == token recurrence, and λ ≡ 1 is SSD."""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.kernels import naive
from fenwick_llm.kernels.state import FenwickState, level_matrix


def _inputs(B, T, G, H, K, V, L, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, G, K, generator=gen, dtype=dtype)
    k = torch.randn(B, T, G, K, generator=gen, dtype=dtype)
    v = torch.randn(B, T, H, V, generator=gen, dtype=dtype)
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype)
    lam = torch.rand(B, T, H, L, generator=gen, dtype=dtype) + 0.5
    return q, k, v, g, lam


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_level_matrix_matches_bucket_definition():
    T = 70
    t = torch.arange(T)
    lvl = level_matrix(t[:, None], t[None, :])
    for ti in range(T):
        for si in range(ti):
            # level l >= 1 of query t is [t - t mod 2^l, t - t mod 2^(l-1))
            l = int(lvl[ti, si])
            lo, hi = ti - ti % (1 << l), ti - ti % (1 << (l - 1))
            assert lo <= si < hi, (ti, si, l)


@pytest.mark.parametrize("T", [1, 7, 64, 65, 130])
def test_quadratic_equals_recurrence(T):
    q, k, v, g, lam = _inputs(2, T, 2, 4, 8, 5, 9)
    o_quad = naive.log_linear_attn(q, k, v, g, lam)
    o_rec, _ = naive.recurrent_log_linear_attn(q, k, v, g, lam)
    assert _rel(o_rec, o_quad) < 1e-12


def test_lambda_one_is_ssd():
    B, T, H, K, V = 1, 40, 2, 4, 3
    q, k, v, g, lam = _inputs(B, T, 1, H, K, V, 7)
    o = naive.log_linear_attn(q, k, v, g, torch.ones_like(lam), scale=1.0)
    # plain SSD written as a running state: S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = q_t^T S_t
    S = torch.zeros(B, H, K, V, dtype=q.dtype)
    ref = torch.empty_like(v)
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None] + k[:, t, 0, None, :, None] * v[:, t, :, None, :]
        ref[:, t] = torch.einsum("bk,bhkv->bhv", q[:, t, 0], S)
    assert _rel(o, ref) < 1e-12


def test_state_round_trip_at_odd_position():
    q, k, v, g, lam = _inputs(2, 50, 1, 2, 4, 3, 7)
    o_full, st_full = naive.recurrent_log_linear_attn(q, k, v, g, lam, output_final_state=True)
    cut = 23
    o1, st1 = naive.recurrent_log_linear_attn(*(x[:, :cut] for x in (q, k, v, g, lam)),
                                              output_final_state=True)
    o2, st2 = naive.recurrent_log_linear_attn(*(x[:, cut:] for x in (q, k, v, g, lam)),
                                              initial_state=FenwickState(st1.levels, st1.positions),
                                              output_final_state=True)
    assert _rel(torch.cat([o1, o2], 1), o_full) < 1e-12
    assert torch.equal(st2.positions, st_full.positions)
    assert _rel(st2.levels, st_full.levels) < 1e-12


def test_too_many_positions_is_an_error():
    q, k, v, g, lam = _inputs(1, 9, 1, 1, 2, 2, 4)  # 4 levels hold 8 positions
    with pytest.raises(ValueError, match="levels"):
        naive.recurrent_log_linear_attn(q, k, v, g, lam)
    with pytest.raises(ValueError, match="levels"):
        naive.log_linear_attn(q, k, v, g, lam)
