"""kernels/gemv_torch.py, gemv_triton.py: the references against the model's modules, the Triton
kernel against the references.

References: bit for bit the model code they stand for (mixer_norm + in_proj, norm_f + lm_head, the
residual adds of out_proj and down_proj, mlp_norm + GatedMLP before down_proj) in every dtype.

Triton on the CPU: the kernel runs under ``TRITON_INTERPRET=1`` in one subprocess (this file run as a
script) on M in {1, 3, 8} rows, K not a multiple of BK (several K steps, one partial), N not a multiple
of BN, an odd MLP width, strided rows, a row of zeros and rows whose scales differ by 10^4 (each row
needs its own rms). The interpreter casts float32 -> bfloat16 by truncation, where the GPU and torch
round to nearest even; the subprocess rounds to nearest even too, so that the model-dtype roundings
(normalised input, Linear output, activation, residual sum) line up with the reference's. Then the only
difference left is the order of the float32 sums (and rsqrt's last bit), which moves a bf16 / fp16
output by at most one ulp, and rarely: the tolerance is 1e-2 relative (bf16 has 8 significant bits,
so one ulp is up to 2^-8 = 0.4%), at most 1 ulp (2 after SiLU-mul, whose gate and up can each move
one) and at most 1% of the elements off. A rounding left out or put in the wrong place moves several
percent of the elements and fails the last check. float32: 1e-5 relative.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from fenwick_llm.kernels import gemv_torch, gemv_triton
from interpreted import DT_ID, round_bf16_to_nearest_even, run_interpreted, ulps

from fenwick_llm import kernels

ROOT = Path(__file__).resolve().parents[1]
DTYPES = list(DT_ID)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest relative error of a row (rows differ in scale by 10^4)."""
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return math.inf
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()


# ----------------------------------------------------------------------------------------------
# References == the model's code


def _model(dtype: torch.dtype):
    """A one-layer tiny random model (tests/tiny.py) in ``dtype``."""
    from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
    from tiny import randomize_, tiny_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LogLinearMamba2ForCausalLM(tiny_config(num_hidden_layers=1), dtype=dtype)
        randomize_(model)
    return model


def _hidden(M: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return (4 * torch.randn(M, 64, generator=torch.Generator().manual_seed(seed))).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_rmsnorm_linear_ref_is_in_proj_and_lm_head(dtype):
    model = _model(dtype)
    block = model.backbone.layers[0]
    h = _hidden(5, dtype)
    assert block.mixer.in_proj.bias is None and model.lm_head.bias is None
    with torch.no_grad():
        norm, in_proj = block.mixer_norm, block.mixer.in_proj
        got = gemv_torch.rmsnorm_linear_ref(h, norm.weight, norm.eps, in_proj.weight)
        assert got.dtype == dtype and torch.equal(got, block.mixer.in_proj(block.mixer_input(h)))
        norm_f = model.backbone.norm_f
        got = gemv_torch.rmsnorm_linear_ref(h, norm_f.weight, norm_f.eps, model.lm_head.weight)
        assert torch.equal(got, model._logits(h))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_rmsnorm_linear_silu_mul_ref_is_the_gated_mlp(dtype, monkeypatch):
    block = _model(dtype).backbone.layers[0]
    mlp = block.mlp
    monkeypatch.setattr(mlp.down_proj, "forward", lambda a: a)
    w_gu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).detach()
    h = _hidden(5, dtype)
    with torch.no_grad():
        got = gemv_torch.rmsnorm_linear_silu_mul_ref(h, block.mlp_norm.weight, block.mlp_norm.eps, w_gu)
        assert got.dtype == dtype and torch.equal(got, mlp(block.mlp_norm(h, h.dtype)))


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_ID.get)
def test_linear_residual_ref_is_the_residual_add(dtype):
    block = _model(dtype).backbone.layers[0]
    gen = torch.Generator().manual_seed(2)
    h = _hidden(5, dtype)
    y = torch.randn(5, block.mixer.config.intermediate_size, generator=gen).to(dtype)
    out_w = block.mixer.out_proj.weight
    with torch.no_grad():
        got = gemv_torch.linear_residual_ref(y, out_w, h)
        assert got.dtype == dtype and torch.equal(got, h + block.mixer.out_proj(y))
        assert torch.equal(got, h + F.linear(y, out_w))
        # the MLP half of a layer in two calls == LogLinearMamba2Block.add_mlp
        w_gu = torch.cat([block.mlp.gate_proj.weight, block.mlp.up_proj.weight])
        a = gemv_torch.rmsnorm_linear_silu_mul_ref(h, block.mlp_norm.weight, block.mlp_norm.eps, w_gu)
        assert torch.equal(gemv_torch.linear_residual_ref(a, block.mlp.down_proj.weight, h), block.add_mlp(h))
        if dtype != torch.float32:  # the comparison sees where the product is rounded
            unrounded = (h.float() + F.linear(y.float(), out_w.float())).to(dtype)
            assert not torch.equal(unrounded, got)


def test_dispatch_takes_the_reference_on_cpu():
    gen = torch.Generator().manual_seed(3)
    h, nw, w = (torch.randn(*s, generator=gen) for s in ((3, 16), (16,), (10, 16)))
    r = torch.randn(3, 10, generator=gen)
    assert torch.equal(kernels.rmsnorm_linear(h, nw, 1e-5, w), gemv_torch.rmsnorm_linear_ref(h, nw, 1e-5, w))
    assert torch.equal(kernels.linear_residual(h, w, r), gemv_torch.linear_residual_ref(h, w, r))
    assert torch.equal(kernels.rmsnorm_linear_silu_mul(h, nw, 1e-5, w),
                       gemv_torch.rmsnorm_linear_silu_mul_ref(h, nw, 1e-5, w))


def test_triton_forms_reject_bad_arguments():
    """Checked before the launch (so on the CPU too): wrong widths, rows, dtypes and layouts."""
    h, nw, w = torch.randn(3, 16), torch.ones(16), torch.randn(10, 16)
    with pytest.raises(ValueError):
        gemv_triton.rmsnorm_linear_triton(h, nw, 1e-5, torch.randn(10, 17))
    with pytest.raises(ValueError):
        gemv_triton.rmsnorm_linear_triton(torch.randn(9, 16), nw, 1e-5, w)  # M > 8
    with pytest.raises(ValueError):
        gemv_triton.rmsnorm_linear_triton(h, nw, 1e-5, torch.randn(16, 10).T)  # not contiguous
    with pytest.raises(ValueError):
        gemv_triton.rmsnorm_linear_triton(h, nw, 1e-5, w.double())
    with pytest.raises(ValueError):
        gemv_triton.linear_residual_triton(h, w, torch.randn(3, 11))
    with pytest.raises(ValueError):
        gemv_triton.rmsnorm_linear_silu_mul_triton(h, nw, 1e-5, torch.randn(9, 16))  # odd 2 * I


def test_default_configs_fit_the_register_and_pipeline_budgets():
    for M in range(1, 9):
        for K in (200, 768, 1536, 2048):
            for itemsize, norm, silu in ((2, True, False), (2, False, False), (2, True, True), (4, 1, 1)):
                c = gemv_triton.default_config(M, K, itemsize, norm, silu)
                m_pad = 1 << (M - 1).bit_length()
                tile = m_pad * c.block_n * (1 << (K - 1).bit_length()) * (2 if silu else 1)
                assert tile <= gemv_triton.PRELOAD_ELEMS or not c.preload, (M, K, c)
                if c.preload:  # registers: at most 64 float32 products a thread
                    assert tile <= 64 * 32 * c.num_warps, (M, K, c)
                    assert c.block_n >= gemv_triton.PRELOAD_MIN_BN, (M, K, c)
                    continue
                assert c.block_k & (c.block_k - 1) == 0 and 32 <= c.block_k <= 512
                assert m_pad * c.block_n * c.block_k * (2 if silu else 1) <= gemv_triton.ACC_ELEMS
                assert 2 <= c.num_stages <= 8
    out_proj = gemv_triton.default_config(8, 1536, 2, False, False)
    assert -(-768 // out_proj.block_n) >= 96  # out_proj fills the SMs
    for K in (768, 1536, 2048):  # batch 1 of the bench model: every layer's GEMV preloads its weights
        assert gemv_triton.default_config(1, K, 2, True, K == 768).preload


# ----------------------------------------------------------------------------------------------
# CPU: the Triton kernel under the interpreter, in a subprocess

PRELOAD = gemv_triton.GemvConfig(8, 32, 1, preload=True)

# op, M, K, N (I for silu_mul), dtype, launch config (None: default_config), strided rows?
CASES = {
    "norm_fp32_M1": dict(op="rmsnorm_linear", M=1, dtype=torch.float32),
    "norm_fp32_M3": dict(op="rmsnorm_linear", M=3, dtype=torch.float32),
    "norm_fp32_M8": dict(op="rmsnorm_linear", M=8, dtype=torch.float32),
    "norm_bf16_M1": dict(op="rmsnorm_linear", M=1, dtype=torch.bfloat16),
    "norm_bf16_M3_strided": dict(op="rmsnorm_linear", M=3, dtype=torch.bfloat16, strided=True),
    "norm_bf16_M8": dict(op="rmsnorm_linear", M=8, dtype=torch.bfloat16),
    "norm_fp16_M5": dict(op="rmsnorm_linear", M=5, dtype=torch.float16),
    "norm_bf16_M8_K1100_two_norm_passes": dict(op="rmsnorm_linear", M=8, K=1100, N=24, dtype=torch.bfloat16,
                                                config=gemv_triton.GemvConfig(8, 128, 4)),
    "norm_bf16_M2_K600_default_config": dict(op="rmsnorm_linear", M=2, K=600, dtype=torch.bfloat16,
                                             config=None),
    "norm_fp32_M3_BN16_BK32": dict(op="rmsnorm_linear", M=3, dtype=torch.float32,
                                   config=gemv_triton.GemvConfig(16, 32, 2)),
    "res_fp32_M1": dict(op="linear_residual", M=1, dtype=torch.float32),
    "res_fp32_M3_strided": dict(op="linear_residual", M=3, dtype=torch.float32, strided=True),
    "res_fp32_M8": dict(op="linear_residual", M=8, dtype=torch.float32),
    "res_bf16_M1": dict(op="linear_residual", M=1, dtype=torch.bfloat16),
    "res_bf16_M3_strided": dict(op="linear_residual", M=3, dtype=torch.bfloat16, strided=True),
    "res_bf16_M8": dict(op="linear_residual", M=8, dtype=torch.bfloat16),
    "res_fp16_M3_default_config": dict(op="linear_residual", M=3, dtype=torch.float16, config=None),
    "silu_fp32_M1_I45": dict(op="rmsnorm_linear_silu_mul", M=1, N=45, dtype=torch.float32),
    "silu_fp32_M3_I45": dict(op="rmsnorm_linear_silu_mul", M=3, N=45, dtype=torch.float32),
    "silu_fp32_M8_I45": dict(op="rmsnorm_linear_silu_mul", M=8, N=45, dtype=torch.float32),
    "silu_bf16_M1_I45": dict(op="rmsnorm_linear_silu_mul", M=1, N=45, dtype=torch.bfloat16),
    "silu_bf16_M3_I45_strided": dict(op="rmsnorm_linear_silu_mul", M=3, N=45, dtype=torch.bfloat16,
                                     strided=True),
    "silu_bf16_M8_I45": dict(op="rmsnorm_linear_silu_mul", M=8, N=45, dtype=torch.bfloat16),
    "silu_bf16_M6_I45_default_config": dict(op="rmsnorm_linear_silu_mul", M=6, N=45, dtype=torch.bfloat16,
                                            config=None),
    # the whole weight slice loaded before the wait (one or two rows; K = 200 pads to 256)
    "preload_norm_bf16_M1": dict(op="rmsnorm_linear", M=1, dtype=torch.bfloat16, config=PRELOAD),
    "preload_norm_fp32_M2_strided": dict(op="rmsnorm_linear", M=2, dtype=torch.float32, config=PRELOAD,
                                         strided=True),
    "preload_res_bf16_M1": dict(op="linear_residual", M=1, dtype=torch.bfloat16, config=PRELOAD),
    "preload_res_fp16_M2": dict(op="linear_residual", M=2, dtype=torch.float16, config=PRELOAD),
    "preload_silu_bf16_M1_I45": dict(op="rmsnorm_linear_silu_mul", M=1, N=45, dtype=torch.bfloat16,
                                     config=PRELOAD),
    "preload_res_bf16_M1_BN2": dict(op="linear_residual", M=1, dtype=torch.bfloat16,
                                    config=gemv_triton.GemvConfig(2, 32, 1, preload=True)),
    "preload_silu_bf16_M1_I45_BN2": dict(op="rmsnorm_linear_silu_mul", M=1, N=45, dtype=torch.bfloat16,
                                         config=gemv_triton.GemvConfig(2, 32, 1, preload=True)),
    "preload_silu_fp32_M1_I45_default_config": dict(op="rmsnorm_linear_silu_mul", M=1, N=45,
                                                    dtype=torch.float32, config=None),
    "preload_norm_bf16_M1_K768_default_config": dict(op="rmsnorm_linear", M=1, K=768, N=20,
                                                     dtype=torch.bfloat16, config=None),
}
SMALL = gemv_triton.GemvConfig(8, 64, 3)  # K = 200: three full K steps and a partial one


def _rows(M: int, K: int, dtype: torch.dtype, gen: torch.Generator, strided: bool) -> torch.Tensor:
    """[M, K] with row scales from 1e-2 to 1e2 and, from M = 3, a row of zeros; strided: a view into wider
    rows at column 3."""
    x = torch.randn(M, K + 7, generator=gen) * torch.logspace(-2, 2, M)[:, None]
    if M >= 3:
        x[1] = 0
    x = x.to(dtype)
    return x[:, 3:3 + K] if strided else x[:, :K].contiguous()


def _nan_empty(*shape, **kw) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=kw.get("dtype"), device=kw.get("device"))


def _case(*, op: str, M: int, dtype: torch.dtype, K: int = 200, N: int = 90,
          config: gemv_triton.GemvConfig | None = SMALL, strided: bool = False, seed: int = 0) -> dict:
    from unittest import mock

    gen = torch.Generator().manual_seed(seed)
    x = _rows(M, K, dtype, gen, strided)
    eps = 1e-3  # large enough that an eps in the wrong place shows in float32
    nw = 1 + 0.2 * torch.randn(K, generator=gen)
    rows = 2 * N if op == "rmsnorm_linear_silu_mul" else N
    w = torch.randn(rows, K, generator=gen) / math.sqrt(K)
    if op == "rmsnorm_linear_silu_mul":
        w[:3] *= 40  # gates of +-30..100: SiLU's exp overflows and saturates
    w = w.to(dtype)
    ref = getattr(gemv_torch, f"{op}_ref")
    tri = getattr(gemv_triton, f"{op}_triton")
    if op == "linear_residual":
        r = (4 * torch.randn(M, N + 5, generator=gen)).to(dtype)
        r = r[:, 2:2 + N] if strided else r[:, :N].contiguous()
        args = (x, w, r)
    else:
        args = (x, nw, eps, w)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    with mock.patch.object(torch, "empty", _nan_empty):  # unwritten outputs show as NaN
        got = tri(*args, config=config)
    want = ref(*args)
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, want.dtype, got.shape, want.shape)
    return {"dtype": DT_ID[dtype], "op": op, "rel": _rel(got, want), "ulps": ulps(got, want),
            "mismatch": (got != want).float().mean().item(),
            "inputs_untouched": all(torch.equal(a, b) for a, b in zip(args, before, strict=True)
                                    if isinstance(a, torch.Tensor))}


def _interpret_cases() -> dict:
    round_bf16_to_nearest_even()
    return {name: _case(**kw) for name, kw in CASES.items()}


@pytest.fixture(scope="module")
def interpret_results() -> dict:
    return run_interpreted(__file__, timeout=300)


TOL = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}


@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreted_matches_reference(interpret_results, case):
    r = interpret_results[case]
    assert r["inputs_untouched"], r
    assert r["rel"] < TOL[r["dtype"]], r
    if r["dtype"] != "fp32":
        assert r["ulps"] <= (2 if r["op"] == "rmsnorm_linear_silu_mul" else 1) and r["mismatch"] <= 0.01, r


if __name__ == "__main__":
    print(json.dumps(_interpret_cases()))
