"""The chunked training attention (tools/chunk_attn.py) against the quadratic reference
(kernels.naive.log_linear_attn): values and gradients, per-dtype tolerances on relative error."""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.kernels import naive
from fenwick_llm.tools.chunk_attn import chunked_log_linear_attn, levels_needed
from fenwick_llm.tools.modeldir import build_model
from fenwick_llm.tools.train_attn import training_attention

# (T, chunk, G, H): T below, at and past the chunk, not a multiple of it, several padded chunk counts
CASES = [(1, 4, 1, 2), (7, 8, 1, 2), (37, 8, 2, 4), (64, 8, 1, 3), (100, 16, 1, 2), (130, 4, 1, 1),
         (300, 32, 2, 2)]
# relative error allowed against the float64 reference, by input dtype (values, gradients)
TOL = {torch.float64: (1e-12, 1e-11), torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-2, None)}


def _inputs(T: int, G: int, H: int, seed: int, B: int = 2, K: int = 8, V: int = 6, extra_levels: int = 1,
            dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    L = levels_needed(T) + extra_levels
    kw = dict(generator=gen, dtype=torch.float64)
    xs = [torch.randn(B, T, G, K, **kw), torch.randn(B, T, G, K, **kw), torch.randn(B, T, H, V, **kw),
          -0.3 * torch.rand(B, T, H, **kw), torch.rand(B, T, H, L, **kw) + 0.5]
    return [x.to(dtype) for x in xs]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _case_id(c: tuple) -> str:
    return "T{}-C{}-G{}-H{}".format(*c)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_chunked_matches_reference_values_and_gradients(case: tuple, dtype: torch.dtype) -> None:
    T, C, G, H = case
    seed = 10 * CASES.index(case) + list(TOL).index(dtype)  # fresh inputs per case, fixed across runs
    ref_in = [x.requires_grad_() for x in _inputs(T, G, H, seed)]
    ours_in = [x.to(dtype).requires_grad_() for x in _inputs(T, G, H, seed)]
    ref = naive.log_linear_attn(*ref_in)
    ours = chunked_log_linear_attn(*ours_in, chunk_size=C)
    assert ours.dtype == dtype and ours.shape == ref.shape
    tol_v, tol_g = TOL[dtype]
    assert rel_err(ours, ref) < tol_v
    if tol_g is None:
        return
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    (ref * w).sum().backward()
    (ours * w.to(dtype)).sum().backward()
    for name, a, b in zip("qkvgλ", ours_in, ref_in, strict=True):
        assert rel_err(a.grad, b.grad) < tol_g, name


def test_chunked_under_autocast_keeps_bf16_accuracy() -> None:
    T, C, G, H = 200, 16, 1, 2
    ref = naive.log_linear_attn(*_inputs(T, G, H, seed=5))
    xs = _inputs(T, G, H, seed=5, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = chunked_log_linear_attn(*xs, chunk_size=C)
    assert ours.dtype == torch.float32
    assert rel_err(ours, ref) < 2e-2


def test_chunked_refuses_bad_arguments() -> None:
    q, k, v, g, lam = _inputs(40, 1, 2, seed=0, extra_levels=0)
    chunked_log_linear_attn(q, k, v, g, lam, chunk_size=8)  # 7 levels for 40 positions: enough
    with pytest.raises(ValueError, match="levels"):
        chunked_log_linear_attn(q, k, v, g, lam[..., :6], chunk_size=8)
    with pytest.raises(ValueError, match="power of two"):
        chunked_log_linear_attn(q, k, v, g, lam, chunk_size=12)


def test_chunked_uses_every_level_in_range() -> None:
    """Changing λ of level l changes the output exactly where some s has level(t, s) == l."""
    T, C = 50, 4
    q, k, v, g, lam = _inputs(T, 1, 1, seed=3)
    base = chunked_log_linear_attn(q, k, v, g, lam, chunk_size=C)
    for level in range(levels_needed(T)):
        bumped = lam.clone()
        bumped[..., level] += 1.0
        diff = (chunked_log_linear_attn(q, k, v, g, bumped, chunk_size=C) - base).abs().amax((0, 2, 3))
        t = torch.arange(T)
        # level l >= 1 of t is non-empty iff bit l-1 of t is set; level 0 always holds t itself
        expect = torch.ones(T, dtype=torch.bool) if level == 0 else ((t >> (level - 1)) & 1).bool()
        assert torch.equal(diff > 1e-12, expect), level


def test_model_forward_agrees_under_chunked_training_attention() -> None:
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=8,
                         lambda_mode="mlp", lambda_levels=9)
    model = build_model(config, torch.device("cpu"), seed=0).eval()
    x = torch.randint(0, 64, (2, 150), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        with training_attention("chunked"):
            ours = model(x)
    assert rel_err(ours, ref) < 1e-5
