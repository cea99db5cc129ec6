"""kernels/mixer_torch.py and mixer_triton.py: the decode inputs (conv step, Δ, g, λ) of one token per
sequence, and the prefill inputs of sequences packed along the rows.

The prefill reference is checked against what ``LogLinearMamba2Mixer.forward`` hands to
``kernels.chunk_log_linear_attn`` (captured by a stand-in) from an empty conv state, and against the
decode reference run one token at a time (the conv states they leave are copies of the same rows: equal).
The Triton kernels run under ``TRITON_INTERPRET=1`` in one subprocess (this file run as a script, as in
test_triton_kernels.py) and are compared with the references: odd head counts, a head_dim that is not a
power of two, conv channel and row blocks that end part-way, strided pools, dt / λ inputs on both sides
of softplus's threshold, and (prefill) sequences shorter than the conv state, of one token, and in slots
out of order.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from interpreted import DT_ID, run_interpreted

ROOT = Path(__file__).resolve().parents[1]
LAMBDA_MODES = ("linear", "mlp", "none")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------------
# The references against the mixer's forward and against each other


def _mixer_args(mixer) -> tuple[tuple, dict]:
    c = mixer.config
    args = (mixer.conv1d.weight[:, 0], mixer.conv1d.bias, mixer.dt_bias, mixer.A_log)
    kw = dict(intermediate_size=c.intermediate_size, n_groups=c.n_groups, state_size=c.state_size,
              num_heads=c.num_heads, head_dim=c.head_dim, lambda_levels=c.lambda_levels,
              lambda_mode=c.lambda_mode)
    if c.lambda_mode == "linear":
        kw["lambda_L"] = mixer.L
    elif c.lambda_mode == "mlp":
        m = mixer.lambda_mlp
        kw.update(fc1_w=m.fc1.weight, fc1_b=m.fc1.bias, fc2_w=m.fc2.weight, fc2_b=m.fc2.bias)
    return args, kw


def _assert_close_to_seen(c, outs, seen, dtype):
    """The kernel-contract outputs (xBC, v, g, lam) against what the mixer computed (``seen``: x, k, q,
    v, g, lam captured from its forward): the conv sums in another order, so float32 to 1e-5 relative and
    16-bit values at most one ulp apart."""
    xBC, v, g, lam = outs
    I, GK = c.intermediate_size, c.n_groups * c.state_size
    pairs = {"x": (xBC[:, :I].unflatten(-1, (c.num_heads, c.head_dim)), seen["x"]),
             "k": (xBC[:, I:I + GK].unflatten(-1, (c.n_groups, c.state_size)), seen["k"]),
             "q": (xBC[:, I + GK:].unflatten(-1, (c.n_groups, c.state_size)), seen["q"]),
             "v": (v, seen["v"]), "g": (g, seen["g"]), "lam": (lam, seen["lam"])}
    assert xBC.dtype == v.dtype == dtype and g.dtype == lam.dtype == torch.float32
    for name, (got, want) in pairs.items():
        assert got.dtype == want.dtype and got.shape == want.shape, name
        if got.dtype == torch.float32:
            assert _rel(got, want) < 1e-5, name
        else:
            assert _bf16_ulps(got, want) <= 1, name


def test_reference_rejects_missing_lambda_params():
    from fenwick_llm.kernels.mixer_torch import mixer_decode_inputs_ref
    H, V, Lv, D = 2, 8, 3, 16 + 2 * 4
    proj = torch.zeros(1, H * V + D + H * (1 + Lv))
    args = (torch.zeros(2, D, 3), torch.tensor([0]), torch.zeros(D, 4), None, torch.zeros(H), torch.zeros(H))
    kw = dict(intermediate_size=H * V, n_groups=1, state_size=4, num_heads=H, head_dim=V, lambda_levels=Lv)
    with pytest.raises(ValueError, match="lambda_L"):
        mixer_decode_inputs_ref(proj, *args, lambda_mode="linear", **kw)
    with pytest.raises(ValueError, match="fc1_w"):
        mixer_decode_inputs_ref(proj, *args, lambda_mode="mlp", **kw)
    with pytest.raises(ValueError, match="proj"):
        mixer_decode_inputs_ref(proj[:, 1:], *args, lambda_mode="none", **kw)


# ----------------------------------------------------------------------------------------------
# The prefill reference against the mixer's prefill and against decode steps

PREFILL_LENS = [5, 1, 2, 9, 3]  # W = 4: one token, fewer than, as many as and more than the W - 1 saved


def _cu(lens: list[int], dtype: torch.dtype = torch.int64, device: str = "cpu") -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("conv_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("lambda_mode", LAMBDA_MODES)
def test_prefill_reference_matches_mixer_forward(monkeypatch, lambda_mode, conv_bias, dtype):
    """Sequences from an empty conv state: the prefill reference's rows equal the mixer's forward over
    each sequence, and each slot's new conv state holds its last W - 1 inputs (zero-padded)."""
    from fenwick_llm.engine.mixer import LogLinearMamba2Mixer
    from fenwick_llm.kernels.mixer_torch import mixer_prefill_inputs_ref
    from tiny import randomize_, tiny_config

    from fenwick_llm import kernels

    c = tiny_config(lambda_mode, hidden_size=48, head_dim=24, state_size=16, n_groups=2,
                    lambda_levels=9, lambda_mlp_hidden=20, use_conv_bias=conv_bias)  # 4 heads of 24 channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        mixer = LogLinearMamba2Mixer(c, dtype=dtype)
        randomize_(mixer)
    lens, P, W = PREFILL_LENS, 9, c.conv_kernel
    gen = torch.Generator().manual_seed(1)
    hs = [torch.randn(1, n, c.hidden_size, generator=gen).to(dtype) for n in lens]
    pool = torch.randn(P, c.conv_dim, W - 1, generator=gen).to(dtype)
    slots = torch.randperm(P, generator=gen)[:len(lens)]
    pool[slots] = 0  # empty conv states: what forward starts from
    parts: dict[str, list[torch.Tensor]] = {}

    def fake_chunk(q, k, v, g, lam, **kw):
        for name, t in (("q", q), ("k", k), ("v", v), ("g", g), ("lam", lam)):
            parts.setdefault(name, []).append(t[0].clone())
        return torch.zeros_like(v), None

    output = mixer._output

    def spy_output(o, x, z):
        parts.setdefault("x", []).append(x[0].clone())
        return output(o, x, z)

    monkeypatch.setattr(kernels, "chunk_log_linear_attn", fake_chunk)
    monkeypatch.setattr(mixer, "_output", spy_output)
    mixer.in_proj.register_forward_hook(lambda m, i, out: parts.setdefault("proj", []).append(out[0].clone()))
    args, kw = _mixer_args(mixer)
    with torch.no_grad():
        for h in hs:
            mixer(h)
        seen = {name: torch.cat(ts) for name, ts in parts.items()}
        ref_pool = pool.clone()
        outs = mixer_prefill_inputs_ref(seen["proj"], _cu(lens), ref_pool, slots, *args, **kw)

    _assert_close_to_seen(c, outs, seen, dtype)
    conv_in = seen["proj"][:, c.intermediate_size:c.intermediate_size + c.conv_dim]  # (T, conv_dim)
    for n, (slot, start) in enumerate(zip(slots.tolist(), _cu(lens)[:-1].tolist(), strict=True)):
        rows = torch.cat([torch.zeros(W - 1, c.conv_dim, dtype=dtype), conv_in[start:start + lens[n]]])
        assert torch.equal(ref_pool[slot], rows[-(W - 1):].T), n  # copies of input rows
    untouched = [i for i in range(P) if i not in slots.tolist()]
    assert torch.equal(ref_pool[untouched], pool[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("lambda_mode", LAMBDA_MODES)
def test_prefill_reference_matches_decode_steps(lambda_mode, dtype):
    # Row t of a sequence is the t-th of one-token decode steps from the sequence's saved conv state, and
    # the conv state the steps leave is the prefill's (copies of the same rows: equal). The steps sum the
    # conv taps and take exp / log over other shapes, so their values may differ by float32 rounding.
    from fenwick_llm.kernels.mixer_torch import mixer_decode_inputs_ref, mixer_prefill_inputs_ref
    lens = PREFILL_LENS
    (proj, pool, slots, *args), kw = _inputs(N=sum(lens), S=len(lens), H=3, V=8, G=1, K=8, mode=lambda_mode,
                                             Lv=5, hidden=12, dtype=dtype)
    cu = _cu(lens, torch.int32)
    prefill_pool, step_pool = pool.clone(), pool.clone()
    out = mixer_prefill_inputs_ref(proj, cu, prefill_pool, slots, *args, **kw)
    steps = [torch.full_like(t, float("nan")) for t in out]
    for t in range(max(lens)):
        live = [n for n, length in enumerate(lens) if t < length]
        rows = cu[live].long() + t
        for got, part in zip(steps, mixer_decode_inputs_ref(proj[rows], step_pool, slots[live], *args, **kw),
                             strict=True):
            got[rows] = part
    assert torch.equal(prefill_pool, step_pool) and not torch.equal(prefill_pool, pool)
    for name, a, b in zip(("xBC", "v", "g", "lam"), out, steps, strict=True):
        assert _rel(a, b) < (1e-6 if a.dtype == torch.float32 else 1e-2), name
        if a.dtype == torch.bfloat16:
            assert _bf16_ulps(a, b) <= 1, name


def test_prefill_reference_rejects_bad_cu_seqlens():
    from fenwick_llm.kernels.mixer_torch import mixer_prefill_inputs_ref
    H, V, Lv, D = 2, 8, 3, 16 + 2 * 4
    proj = torch.zeros(3, H * V + D + H * (1 + Lv))
    rest = (torch.zeros(4, D, 3), torch.tensor([2, 0]), torch.zeros(D, 4), None, torch.zeros(H),
            torch.zeros(H))
    kw = dict(intermediate_size=H * V, n_groups=1, state_size=4, num_heads=H, head_dim=V, lambda_levels=Lv,
              lambda_mode="none")
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer_prefill_inputs_ref(proj, torch.tensor([[0, 1, 3]]), *rest, **kw)
    with pytest.raises(ValueError, match="cu_seqlens"):
        mixer_prefill_inputs_ref(proj, torch.tensor([0.0, 1.0, 3.0]), *rest, **kw)
    with pytest.raises(ValueError, match="slots"):
        mixer_prefill_inputs_ref(proj, torch.tensor([0, 3]), *rest, **kw)
    mixer_prefill_inputs_ref(proj, torch.tensor([0, 1, 3]), *rest, **kw)


# ----------------------------------------------------------------------------------------------
# Triton (interpreter) against the reference, in a subprocess


def _inputs(*, N, H, V, G, K, mode, S=None, Lv=9, hidden=20, W=4, bias=True, dtype=torch.float32,
            strided=False, seed=0, device="cpu"):
    """Random (proj [N rows], conv_pool, slots [S, default N], conv_weight, conv_bias, dt_bias, A_log) and
    keyword arguments."""
    I = H * V
    D = I + 2 * G * K
    cols = I + D + H * (1 + Lv)
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(N, cols + 5 * strided, generator=gen)[:, :cols]  # strided: rows longer than cols
    proj[:, I + D:] *= 12  # dt and dl on both sides of softplus's threshold
    proj[0, I + D] = 30.0
    proj[-1, I + D + H - 1] = -60.0
    S = N if S is None else S
    P = S + 4
    if strided:  # channels not contiguous: [P, W-1, D] storage seen as [P, D, W-1]
        pool = torch.randn(P, W - 1, D, generator=gen).transpose(1, 2)
    else:
        pool = torch.randn(P, D, W - 1, generator=gen)
    slots = torch.randperm(P, generator=gen)[:S]
    weight = 0.5 * torch.randn(D, W, generator=gen)
    conv_bias = 0.1 * torch.randn(D, generator=gen) if bias else None
    dt = torch.empty(H).uniform_(0.01, 0.3, generator=gen)
    dt_bias = dt + torch.log(-torch.expm1(-dt))
    A_log = torch.empty(H).uniform_(math.log(0.5), math.log(8.0), generator=gen)
    kw = dict(intermediate_size=I, n_groups=G, state_size=K, num_heads=H, head_dim=V, lambda_levels=Lv,
              lambda_mode=mode)
    if mode == "linear":
        kw["lambda_L"] = (1 + 0.5 * torch.randn(H, Lv, generator=gen)).to(device)
    elif mode == "mlp":
        fc = dict(fc1_w=torch.randn(hidden, Lv, generator=gen) / 3,
                  fc1_b=0.5 * torch.randn(hidden, generator=gen),
                  fc2_w=0.3 * torch.randn(Lv, hidden, generator=gen),
                  fc2_b=0.3 * torch.randn(Lv, generator=gen))
        kw.update({name: t.to(device) for name, t in fc.items()})
    proj, pool, weight = (t.to(device, dtype) for t in (proj, pool, weight))
    conv_bias = None if conv_bias is None else conv_bias.to(device, dtype)
    return (proj, pool, slots.to(device), weight, conv_bias, dt_bias.to(device), A_log.to(device)), kw


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest elementwise |a - b| in bf16 ulps of max(|a|, |b|)."""
    a, b = a.float(), b.float()
    m = torch.maximum(a.abs(), b.abs()).clamp_min(2.0 ** -126)
    return ((a - b).abs() / torch.exp2(torch.floor(torch.log2(m)) - 7)).max().item()


def _compare(out, ref, pool, new_pool, ref_pool, slots) -> dict:
    untouched = [i for i in range(pool.shape[0]) if i not in slots.tolist()]
    res = {f"{k}_rel": _rel(a, b) for k, a, b in zip(("xBC", "v", "g", "lam"), out, ref, strict=True)}
    if out[0].dtype == torch.bfloat16:
        res.update(xBC_ulps=_bf16_ulps(out[0], ref[0]), v_ulps=_bf16_ulps(out[1], ref[1]))
    res["dtypes"] = [str(t.dtype) for t in out] == [str(t.dtype) for t in ref]
    res["pool_equal"] = bool(torch.equal(new_pool, ref_pool))
    res["others_untouched"] = bool(torch.equal(new_pool[untouched], pool[untouched]))
    return res


def _case_triton(name, *, block_c=32, **kw):
    from fenwick_llm.kernels.mixer_torch import mixer_decode_inputs_ref
    from fenwick_llm.kernels.mixer_triton import mixer_decode_inputs_triton
    (proj, pool, *args), kwargs = _inputs(**kw)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = mixer_decode_inputs_ref(proj, ref_pool, *args, **kwargs)
    out = mixer_decode_inputs_triton(proj, new_pool, *args, block_c=block_c, **kwargs)
    return {name: _compare(out, ref, pool, new_pool, ref_pool, args[0])}


CASES = {
    "fp32_mlp_bias_blocks": dict(N=3, H=3, V=24, G=1, K=16, mode="mlp"),
    "fp32_linear_nobias_G3": dict(N=3, H=3, V=24, G=3, K=8, mode="linear", bias=False, seed=1),
    "fp32_none_one_row": dict(N=1, H=5, V=24, G=1, K=16, mode="none", seed=2),
    "fp32_mlp_strided_one_block_W3": dict(N=3, H=3, V=24, G=1, K=16, mode="mlp", strided=True, block_c=256,
                                          W=3, seed=3),
    "bf16_mlp_bias": dict(N=3, H=3, V=24, G=1, K=16, mode="mlp", dtype=torch.bfloat16, seed=4),
    "bf16_linear_nobias_strided": dict(N=3, H=5, V=24, G=1, K=16, mode="linear", bias=False,
                                       dtype=torch.bfloat16, strided=True, seed=5),
}


def _case_prefill(name, *, lens, cu_dtype=torch.int64, block_t=8, block_c=16, block_m=16, **kw):
    from fenwick_llm.kernels.mixer_torch import mixer_prefill_inputs_ref
    from fenwick_llm.kernels.mixer_triton import mixer_prefill_inputs_triton
    (proj, pool, *args), kwargs = _inputs(N=sum(lens), S=len(lens), **kw)
    cu = _cu(lens, cu_dtype)
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = mixer_prefill_inputs_ref(proj, cu, ref_pool, *args, **kwargs)
    out = mixer_prefill_inputs_triton(proj, cu, new_pool, *args, block_t=block_t, block_c=block_c,
                                      block_m=block_m, **kwargs)
    return {name: _compare(out, ref, pool, new_pool, ref_pool, args[0])}


PREFILL_CASES = {  # D = H V + 2 G K = 40 to 56 conv channels in blocks of 16; rows in blocks of 8, of which
    # those with every window inside its sequence take the conv's fast path
    "fp32_mlp_bias": dict(lens=[5, 1, 2, 19, 3], H=2, V=8, G=1, K=16, mode="mlp", Lv=5, hidden=12),
    "fp32_linear_nobias_G2_int32": dict(lens=[1, 7, 3, 2, 7], H=3, V=8, G=2, K=4, mode="linear", Lv=5,
                                        bias=False, cu_dtype=torch.int32, seed=1),
    "fp32_none_one_sequence": dict(lens=[20], H=3, V=8, G=1, K=16, mode="none", Lv=5, seed=2),
    "fp32_mlp_single_tokens": dict(lens=[1] * 6, H=2, V=12, G=1, K=8, mode="mlp", Lv=5, hidden=12, seed=3),
    "fp32_mlp_strided_one_block_W3": dict(lens=[2, 1, 14, 3], H=2, V=8, G=1, K=16, mode="mlp", Lv=5,
                                          hidden=12, strided=True, W=3, block_t=32, block_c=64, block_m=64,
                                          seed=4),
    "bf16_mlp_bias": dict(lens=[3, 1, 2, 20, 4], H=2, V=8, G=1, K=16, mode="mlp", Lv=5, hidden=12,
                          dtype=torch.bfloat16, seed=5),
    "bf16_linear_nobias_strided": dict(lens=[3, 1, 2, 8, 6], H=3, V=8, G=1, K=8, mode="linear", Lv=5,
                                       bias=False, dtype=torch.bfloat16, strided=True, seed=6),
}


def _interpret_cases() -> dict:
    res = {}
    for name, kw in CASES.items():
        res.update(_case_triton(name, **kw))
    for name, kw in PREFILL_CASES.items():
        res.update(_case_prefill(f"prefill_{name}", **kw))
    return res


@pytest.fixture(scope="module")
def interpret_results() -> dict:
    return run_interpreted(__file__, timeout=600)


@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreted_matches_reference(interpret_results, case):
    # fp32: exp, erf and softplus (log1p by a series) differ from torch's by a few ulp. g and λ are
    # float32 functions of exact inputs, so they keep that tolerance in bf16 too. The interpreter casts
    # float32 to bf16 by truncation (the GPU and torch round to nearest even), so xBC can be one bf16 ulp
    # off and v = x Δ, rounded from a truncated x, up to three.
    _assert_interpreted_close(interpret_results[case], case)


def _assert_interpreted_close(r: dict, case: str) -> None:
    _assert_kernel_close(r, case.startswith("fp32"), rel=1e-6, v_ulps=3, bf16_rel=1e-2)


def _assert_kernel_close(r: dict, fp32: bool, rel: float, v_ulps: int, bf16_rel: float) -> None:
    """One ``_compare`` result: pools exact, g and λ within ``rel``; xBC and v within ``rel`` (fp32) or
    one / ``v_ulps`` bf16 ulps and ``bf16_rel``."""
    assert r["dtypes"] and r["pool_equal"] and r["others_untouched"], r
    assert r["g_rel"] < rel and r["lam_rel"] < rel, r
    if fp32:
        assert r["xBC_rel"] < rel and r["v_rel"] < rel, r
    else:
        assert r["xBC_ulps"] <= 1 and r["v_ulps"] <= v_ulps, r
        assert r["xBC_rel"] < bf16_rel and r["v_rel"] < bf16_rel, r


@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_triton_prefill_interpreted_matches_reference(interpret_results, case):
    # The decode kernel's tolerances: the prefill computes each row as the decode kernel does.
    _assert_interpreted_close(interpret_results[f"prefill_{case}"], case)


# ----------------------------------------------------------------------------------------------
# GPU: realistic shapes, NaN-filled outputs, CUDA graph replay (decode)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("mode", LAMBDA_MODES)
def test_gpu_matches_reference_and_replays_in_a_graph(mode, dtype):
    from fenwick_llm.kernels import mixer_decode_inputs
    from fenwick_llm.kernels.mixer_torch import mixer_decode_inputs_ref
    (proj, pool, *args), kw = _inputs(N=512, H=64, V=64, G=1, K=128, mode=mode, Lv=15, hidden=64, dtype=dtype,
                                      device="cuda")
    ref_pool = pool.clone()
    ref = mixer_decode_inputs_ref(proj, ref_pool, *args, **kw)
    eager_pool, graph_pool = pool.clone(), pool.clone()
    torch.full((1 << 28,), float("nan"), device="cuda")  # freed to the cache: unwritten outputs show as NaN
    results = [_compare(mixer_decode_inputs(proj, eager_pool, *args, **kw), ref, pool, eager_pool, ref_pool,
                        args[0])]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mixer_decode_inputs(proj, graph_pool, *args, **kw)
    graph_pool.copy_(pool)
    for t in out:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    results.append(_compare(out, ref, pool, graph_pool, ref_pool, args[0]))
    for r in results:
        # GPU exp and division are approximate (a few ulp): 1e-5 relative in float32. bf16 rounds to
        # nearest even as torch does: an fp32 difference flips xBC by at most one ulp and v by two.
        _assert_kernel_close(r, dtype == torch.float32, rel=1e-5, v_ulps=2, bf16_rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=DT_ID.get)
@pytest.mark.parametrize("mode", LAMBDA_MODES)
def test_gpu_prefill_matches_reference(mode, dtype):
    from fenwick_llm.kernels import mixer_prefill_inputs
    from fenwick_llm.kernels.mixer_torch import mixer_prefill_inputs_ref
    lens = [700, 1, 1297, 2, 1000]
    (proj, pool, *args), kw = _inputs(N=sum(lens), S=len(lens), H=24, V=64, G=1, K=128, mode=mode, Lv=15,
                                      hidden=64, dtype=dtype, device="cuda")  # D = 1792 conv channels
    cu = _cu(lens, device="cuda")
    ref_pool, new_pool = pool.clone(), pool.clone()
    ref = mixer_prefill_inputs_ref(proj, cu, ref_pool, *args, **kw)
    torch.full((1 << 28,), float("nan"), device="cuda")  # freed to the cache: unwritten outputs show as NaN
    out = mixer_prefill_inputs(proj, cu, new_pool, *args, **kw)
    torch.cuda.synchronize()
    r = _compare(out, ref, pool, new_pool, ref_pool, args[0])
    _assert_kernel_close(r, dtype == torch.float32, rel=1e-5, v_ulps=2, bf16_rel=1e-3)  # as for decode


if __name__ == "__main__":
    print(json.dumps(_interpret_cases()))
