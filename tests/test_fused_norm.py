"""kernels/norm_torch.py and norm_triton.py: the references against the model's code, the Triton kernels
against the references.

References: bit for bit the model code they stand for (engine/mixer.py's RMSNorm and ``_output`` before
out_proj, engine/model.py's residual add and GatedMLP before down_proj), in every dtype.

Triton on the CPU: the kernels run under ``TRITON_INTERPRET=1`` in one subprocess (this file run as a
script), on odd widths, groups that straddle heads, strided views and 1, 3 or 5 rows. The interpreter
casts float32 -> bfloat16 by truncation, where the GPU (LLVM fptrunc) and torch round to nearest even;
the subprocess rounds to nearest even too, so that bf16 results compare bit for bit. Outputs in float32
of bf16 inputs expose a rounding in the wrong place (~1e-3) under a 1e-5 tolerance.

GPU (``gpu`` marker): decode widths, and a CUDA graph replay of all three ops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fenwick_llm.kernels import add_rmsnorm, gated_rmsnorm, silu_mul
from interpreted import DT_ID, round_bf16_to_nearest_even, run_interpreted, ulps

ROOT = Path(__file__).resolve().parents[1]
DTYPES = list(DT_ID)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    return {"dtype": DT_ID[got.dtype], "rel": _rel(got, want), "ulps": ulps(got, want),
            "mismatch": (got != want).float().mean().item()}


TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}


def _assert_close(r: dict) -> None:
    """float32: relative error; bf16 / fp16: at most 1 ulp apart, in at most 1% of the elements."""
    assert r["rel"] < TOL[r["dtype"]], r
    if r["dtype"] != "fp32":
        assert r["ulps"] <= 1 and r["mismatch"] <= 0.01, r


# ----------------------------------------------------------------------------------------------
# References == the model's code


def _block(dtype: torch.dtype, **overrides):
    """Layer 0 of a tiny random model (tests/tiny.py) in ``dtype``."""
    from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
    from tiny import randomize_, tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LogLinearMamba2ForCausalLM(tiny_config(num_hidden_layers=1, **overrides), dtype=dtype)
        randomize_(model)
    return model.backbone.layers[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_add_rmsnorm_ref_is_the_model_path(dtype):
    block = _block(dtype)
    gen = torch.Generator().manual_seed(1)
    h0 = (4 * torch.randn(5, 64, generator=gen)).to(dtype)
    delta = torch.randn(5, 64, generator=gen).to(dtype)
    w, eps = block.mlp_norm.weight, block.mlp_norm.eps
    with torch.no_grad():
        h = h0 + delta  # LogLinearMamba2ForCausalLM.decode: h = h + mixer.decode(...)
        normed, got_h = add_rmsnorm(delta, h0, w, eps)
        assert torch.equal(got_h, h) and got_h.dtype == dtype
        assert torch.equal(normed, block.mlp_norm(h, h.dtype)) and normed.dtype == dtype
        assert torch.equal(add_rmsnorm(delta, h0, w, eps, out_dtype=torch.float32)[0],
                           block.mlp_norm(h, torch.float32))
        normed, same = add_rmsnorm(h0, None, block.mixer_norm.weight, block.mixer_norm.eps)
        assert same is h0 and torch.equal(normed, block.mixer_input(h0))
        if dtype != torch.float32:  # the comparison sees where h is rounded
            unrounded = block.mlp_norm(h0.float() + delta.float(), dtype)
            assert not torch.equal(unrounded, block.mlp_norm(h, dtype))


MIXER_CASES = {
    "norm_after_gate": {},
    "norm_before_gate": {"norm_before_gate": True},
    "no_norm": {"rmsnorm": False},
    "after_gate_D_hdim_2groups": {"D_has_hdim": True, "n_groups": 2},
    "before_gate_D_hdim_4groups": {"norm_before_gate": True, "D_has_hdim": True, "n_groups": 4},
    "no_norm_D_hdim": {"rmsnorm": False, "D_has_hdim": True},
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_gated_rmsnorm_ref_is_the_mixer_output(case, dtype, monkeypatch):
    mixer = _block(dtype, **MIXER_CASES[case]).mixer
    monkeypatch.setattr(mixer.out_proj, "forward", lambda y: y)
    c = mixer.config
    N, H, V, I = 5, c.num_heads, c.head_dim, c.intermediate_size
    gen = torch.Generator().manual_seed(2)
    proj = torch.randn(N, c.in_proj_size, generator=gen).to(dtype)
    z, xBC, _, _ = mixer._split(proj)  # strided views, as in decode
    x = xBC[:, :I].unflatten(-1, (H, V))  # (N, H, V)
    o = torch.randn(N, H, V, generator=gen).to(dtype)
    weight = mixer.norm.weight if c.rmsnorm else None
    with torch.no_grad():
        for oi in (o, o.float()):  # o in the model dtype (the step kernel's output) or float32
            got = gated_rmsnorm(oi, x, mixer.D, z, weight, c.norm_eps, I // c.n_groups, c.norm_before_gate,
                                dtype)
            assert got.dtype == dtype and torch.equal(got, mixer._output(oi, x, z))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_silu_mul_ref_is_the_gated_mlp(dtype, monkeypatch):
    mlp = _block(dtype).mlp
    monkeypatch.setattr(mlp.down_proj, "forward", lambda y: y)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        got = silu_mul(torch.cat([gate, up], -1))
        assert got.dtype == dtype and torch.equal(got, mlp(x))
        assert torch.equal(silu_mul(torch.cat([gate, up], -1), torch.float32), F.silu(gate.float()) * up)


# ----------------------------------------------------------------------------------------------
# CPU: Triton kernels under the interpreter, in a subprocess

ADD_CASES = {  # N, D, dtype, residual?, strided rows?
    "fp32_N1_D72": dict(N=1, D=72, dtype=torch.float32),
    "fp32_N5_D72_strided": dict(N=5, D=72, dtype=torch.float32, strided=True),
    "fp32_N3_D64_no_residual": dict(N=3, D=64, dtype=torch.float32, residual=False),
    "bf16_N1_D200": dict(N=1, D=200, dtype=torch.bfloat16),
    "bf16_N3_D72": dict(N=3, D=72, dtype=torch.bfloat16),
    "bf16_N5_D200_strided": dict(N=5, D=200, dtype=torch.bfloat16, strided=True),
    "bf16_N5_D72_no_residual": dict(N=5, D=72, dtype=torch.bfloat16, residual=False, strided=True),
    "fp16_N3_D72": dict(N=3, D=72, dtype=torch.float16),
}

GATED_CASES = {  # H, V, group size, D per channel?, norm?, norm before gate?, N, dtype, o dtype
    "fp32_N1_after_gate_3groups": dict(N=1, dtype=torch.float32, group_size=24),
    "fp32_N3_before_gate_D_hdim": dict(N=3, dtype=torch.float32, group_size=36, D_hdim=True, before=True),
    "fp32_N5_no_norm": dict(N=5, dtype=torch.float32, norm=False),
    "bf16_N1_after_gate_1group_D_hdim": dict(N=1, dtype=torch.bfloat16, group_size=72, D_hdim=True),
    "bf16_N3_before_gate_3groups": dict(N=3, dtype=torch.bfloat16, group_size=24, before=True),
    "bf16_N5_after_gate_2groups": dict(N=5, dtype=torch.bfloat16, group_size=36),
    "bf16_N5_no_norm_D_hdim": dict(N=5, dtype=torch.bfloat16, norm=False, D_hdim=True),
    "bf16_N3_o_fp32_before_gate": dict(N=3, dtype=torch.bfloat16, o_dtype=torch.float32, group_size=36,
                                       before=True),
    "bf16_N5_groups_straddle_heads": dict(N=5, dtype=torch.bfloat16, H=3, V=20, group_size=30, D_hdim=True),
    "fp32_N3_groups_straddle_heads": dict(N=3, dtype=torch.float32, H=3, V=20, group_size=30, before=True),
    "fp16_N3_after_gate_2groups": dict(N=3, dtype=torch.float16, group_size=36),
    "fp32_N2_wide_group": dict(N=2, dtype=torch.float32, o_dtype=torch.float32, H=8, V=160, group_size=1280),
}

SILU_CASES = {  # N, I, dtype, strided rows?
    "fp32_N1_I36": dict(N=1, I=36, dtype=torch.float32),
    "fp32_N5_I100_strided": dict(N=5, I=100, dtype=torch.float32, strided=True),
    "bf16_N3_I36": dict(N=3, I=36, dtype=torch.bfloat16),
    "bf16_N5_I100_strided": dict(N=5, I=100, dtype=torch.bfloat16, strided=True),
    "fp16_N3_I50": dict(N=3, I=50, dtype=torch.float16),
}


def _rows(N: int, width: int, dtype: torch.dtype, gen: torch.Generator, strided: bool = False,
          scale: float = 1.0) -> torch.Tensor:
    """[N, width]; strided: a view at column 5 of wider rows."""
    if not strided:
        return (scale * torch.randn(N, width, generator=gen)).to(dtype)
    return (scale * torch.randn(N, width + 11, generator=gen)).to(dtype)[:, 5:5 + width]


def _case_add(*, N, D, dtype, residual=True, strided=False, seed=0) -> dict:
    from fenwick_llm.kernels.norm_torch import add_rmsnorm_ref
    from fenwick_llm.kernels.norm_triton import add_rmsnorm_triton

    gen = torch.Generator().manual_seed(seed)
    h0 = _rows(N, D, dtype, gen, strided, scale=4.0)
    x = _rows(N, D, dtype, gen, strided)
    r = h0 if residual else None
    w = 1 + 0.2 * torch.randn(D, generator=gen)
    res = {}
    for out_dtype in (None, torch.float32):
        normed, h = add_rmsnorm_triton(x, r, w, 1e-5, out_dtype=out_dtype)
        ref_normed, ref_h = add_rmsnorm_ref(x, r, w, 1e-5, out_dtype=out_dtype)
        res["normed" if out_dtype is None else "normed_f32"] = _compare(normed, ref_normed)
        res["h_equal"] = bool(torch.equal(h, ref_h)) and h.dtype == dtype
    return res


def _case_gated(*, N, dtype, H=6, V=12, group_size=72, D_hdim=False, norm=True, before=False, o_dtype=None,
                seed=0) -> dict:
    from fenwick_llm.kernels.norm_torch import gated_rmsnorm_ref
    from fenwick_llm.kernels.norm_triton import gated_rmsnorm_triton

    gen = torch.Generator().manual_seed(seed)
    I = H * V
    proj = (2 * torch.randn(N, 2 * I + 9, generator=gen)).to(dtype)  # [z | x | rest], as in_proj's output
    z, x = proj[:, :I], proj[:, I:2 * I].unflatten(-1, (H, V))
    o = torch.randn(N, H, V, generator=gen).to(o_dtype or dtype)
    D = 1 + 0.5 * torch.randn(I if D_hdim else H, generator=gen)
    w = 1 + 0.2 * torch.randn(I, generator=gen) if norm else None
    before_call = proj.clone()
    res = {}
    for key, out_dtype in (("y", dtype), ("y_f32", torch.float32)):
        got = gated_rmsnorm_triton(o, x, D, z, w, 1e-5, group_size, before, out_dtype)
        want = gated_rmsnorm_ref(o, x, D, z, w, 1e-5, group_size, before, out_dtype)
        res[key] = _compare(got, want)
    res["inputs_untouched"] = bool(torch.equal(proj, before_call))
    return res


def _case_silu(*, N, I, dtype, strided=False, seed=0) -> dict:
    from fenwick_llm.kernels.norm_torch import silu_mul_ref
    from fenwick_llm.kernels.norm_triton import silu_mul_triton

    gen = torch.Generator().manual_seed(seed)
    gate_up = _rows(N, 2 * I, dtype, gen, strided, scale=3.0)
    gate_up[0, :5] = torch.tensor([-100.0, -30.0, 0.0, 30.0, 100.0])  # exp overflow and saturation
    res = {}
    for out_dtype in (None, torch.float32):
        got, want = silu_mul_triton(gate_up, out_dtype), silu_mul_ref(gate_up, out_dtype)
        res["y" if out_dtype is None else "y_f32"] = _compare(got, want)
    return res


def _interpret_cases() -> dict:
    round_bf16_to_nearest_even()
    res = {}
    res.update({f"add_{name}": _case_add(**kw) for name, kw in ADD_CASES.items()})
    res.update({f"gated_{name}": _case_gated(**kw) for name, kw in GATED_CASES.items()})
    res.update({f"silu_{name}": _case_silu(**kw) for name, kw in SILU_CASES.items()})
    return res


@pytest.fixture(scope="module")
def interpret_results() -> dict:
    return run_interpreted(__file__, timeout=300)


@pytest.mark.parametrize("case", list(ADD_CASES))
def test_add_rmsnorm_interpreted(interpret_results, case):
    r = interpret_results[f"add_{case}"]
    assert r["h_equal"], r  # one rounded add: bit for bit
    _assert_close(r["normed"])
    _assert_close(r["normed_f32"])


@pytest.mark.parametrize("case", list(GATED_CASES))
def test_gated_rmsnorm_interpreted(interpret_results, case):
    r = interpret_results[f"gated_{case}"]
    assert r["inputs_untouched"], r
    _assert_close(r["y"])
    _assert_close(r["y_f32"])


@pytest.mark.parametrize("case", list(SILU_CASES))
def test_silu_mul_interpreted(interpret_results, case):
    r = interpret_results[f"silu_{case}"]
    _assert_close(r["y"])
    _assert_close(r["y_f32"])


# ----------------------------------------------------------------------------------------------
# GPU: decode widths, CUDA graph replay


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_gpu_kernels_match_references_in_a_cuda_graph(dtype):
    from fenwick_llm.kernels import norm_torch

    from fenwick_llm import kernels

    N, hidden, H, V, G, I_mlp = 512, 2048, 64, 64, 8, 5632
    I = H * V
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, device="cuda", generator=gen)).to(dtype)

    h0, delta = randn(N, hidden, scale=4.0), randn(N, hidden)
    w_h = 1 + 0.2 * torch.randn(hidden, device="cuda", generator=gen)
    proj = randn(N, 2 * I + 100, scale=2.0)
    z, x = proj[:, :I], proj[:, I:2 * I].unflatten(-1, (H, V))
    o = randn(N, H, V)
    D = 1 + 0.5 * torch.randn(H, device="cuda", generator=gen)
    w_y = 1 + 0.2 * torch.randn(I, device="cuda", generator=gen)
    gate_up = randn(N, 2 * I_mlp, scale=3.0)

    def step() -> tuple[torch.Tensor, ...]:
        normed, h = kernels.add_rmsnorm(delta, h0, w_h, 1e-5)
        y = kernels.gated_rmsnorm(o, x, D, z, w_y, 1e-5, I // G, False, dtype)
        return normed, h, y, kernels.silu_mul(gate_up)

    eager = step()  # also compiles the kernels before the capture
    refs = (*norm_torch.add_rmsnorm_ref(delta, h0, w_h, 1e-5),
            norm_torch.gated_rmsnorm_ref(o, x, D, z, w_y, 1e-5, I // G, False, dtype),
            norm_torch.silu_mul_ref(gate_up))
    assert torch.equal(eager[1], refs[1])
    for got, want in zip(eager, refs, strict=True):
        _assert_close(_compare(got, want))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (h0, delta, proj, o, gate_up):
        t.copy_(torch.randn(t.shape, device="cuda", generator=gen).to(dtype))
    graph.replay()
    for got, want in zip(captured, step(), strict=True):
        assert torch.equal(got, want)


if __name__ == "__main__":
    print(json.dumps(_interpret_cases()))
