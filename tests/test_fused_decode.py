"""The fused decode and prefill paths (engine/model.py ``_decode_fused``, ``_prefill_fused``) against the
op-by-op ``decode`` and ``prefill``.

On the CPU the fused path's calls run their PyTorch references (kernels.mixer_step, kernels.norm,
kernels.step_torch), so this checks the wiring: which tensors go where, the residual adds folded into
the norms, the fused gate/up weight. The Triton kernels themselves are compared with those
references in their own tests; the GPU test here runs the whole fused step on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.state import ModelState
from tiny import randomize_, tiny_config

# mixer configurations beside the default: grouped norm before the gate, no norm, per-channel D, no conv bias
MIXER_VARIANTS = pytest.mark.parametrize(
    "overrides", [dict(n_groups=2, norm_before_gate=True), dict(rmsnorm=False),
                  dict(D_has_hdim=True, use_conv_bias=False)],
    ids=["groups_norm_first", "no_norm", "D_hdim_no_conv_bias"])


def _model(mode: str, dtype: torch.dtype, device: str = "cpu", **overrides) -> LogLinearMamba2ForCausalLM:
    torch.manual_seed(0)
    model = LogLinearMamba2ForCausalLM(tiny_config(mode, **overrides), device=device, dtype=dtype)
    randomize_(model)  # λ, Δ, D and the norms vary, so a wrong level or gate shows
    return model.eval()


def _decode_both(model: LogLinearMamba2ForCausalLM, steps: int = 5, gemv_path: bool = False,
                 lens: tuple[int, ...] = (5, 1, 17), state_dtype: torch.dtype = torch.float32):
    """Prefill 3 sequences of different lengths, then decode ``steps`` tokens with both paths
    (the fused one through kernels.gemv, as for a few rows on CUDA, when ``gemv_path``)."""
    if gemv_path:
        model.small_batch_gemv = lambda h: True
    dev = model.device
    cfg = model.config
    n = len(lens)
    states = [ModelState.allocate(cfg, 2 * n, dev, model.dtype, state_dtype=state_dtype) for _ in range(2)]
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(2 * n, generator=gen)[:n].to(dev)
    ids = torch.randint(1, cfg.vocab_size, (sum(lens),), generator=gen).to(dev)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], device=dev)
    for st in states:
        model.prefill(ids, cu, st, slots)
    outs = ([], [])
    for _ in range(steps):
        tok = torch.randint(1, cfg.vocab_size, (n,), generator=gen).to(dev)
        for j, st in enumerate(states):
            model.enable_fused_decode(j == 1)
            outs[j].append(model.decode(tok, st, slots))
    model.enable_fused_decode(False)
    return torch.stack(outs[0]), torch.stack(outs[1]), states


@pytest.mark.parametrize("mode", ["mlp", "linear", "none"])
def test_fused_decode_matches_decode_fp32(mode: str) -> None:
    model = _model(mode, torch.float32)
    ref, fused, (s0, s1) = _decode_both(model)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip([*s0.levels, *s0.conv, s0.positions], [*s1.levels, *s1.conv, s1.positions], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_gemv_decode_path_matches_decode_fp32(mode: str) -> None:
    model = _model(mode, torch.float32)
    ref, fused, (s0, s1) = _decode_both(model, gemv_path=True)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(s0.levels, s1.levels, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@MIXER_VARIANTS
def test_fused_decode_matches_decode_variants(overrides: dict) -> None:
    model = _model("mlp", torch.float32, **overrides)
    ref, fused, _ = _decode_both(model, steps=3)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_fused_decode_bf16_close() -> None:
    model = _model("mlp", torch.bfloat16)
    ref, fused, _ = _decode_both(model, steps=3)
    err = ((fused - ref).norm() / ref.norm()).item()
    assert err < 2e-2, err


def test_fused_decode_with_bf16_state() -> None:
    model = _model("mlp", torch.float32)
    ref, fused, (s0, s1) = _decode_both(model, steps=4, state_dtype=torch.bfloat16)
    assert s0.levels[0].dtype == s1.levels[0].dtype == torch.bfloat16
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)


def test_fuse_gate_up_keeps_names_and_values() -> None:
    model = _model("mlp", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.enable_fused_decode()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    mlp = model.backbone.layers[0].mlp
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()


def _prefill_both(model: LogLinearMamba2ForCausalLM, chunks: list[tuple[int, ...]],
                  state_dtype: torch.dtype = torch.float32, host_starts: bool = True,
                  token_window: bool = False):
    """Prefill len(chunks[0]) sequences chunk after chunk (the first from empty slots, the rest
    continuing from the state; a 0 length skips that sequence) with the op-by-op and the fused path.
    Returns the logits of each call per path and the two states."""
    dev = model.device
    cfg = model.config
    n = len(chunks[0])
    states = [ModelState.allocate(cfg, 2 * n + 1, dev, model.dtype, state_dtype=state_dtype,
                                  token_window=token_window) for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    slots = torch.randperm(2 * n + 1, generator=gen)[:n].to(dev)
    done = [0] * n
    outs = ([], [])
    for lens in chunks:
        live = [i for i, m in enumerate(lens) if m]
        ids = torch.randint(1, cfg.vocab_size, (sum(lens),), generator=gen).to(dev)
        cu = torch.tensor([0, *torch.tensor([lens[i] for i in live]).cumsum(0).tolist()])
        starts = [done[i] for i in live] if host_starts else None
        for j, st in enumerate(states):
            model.enable_fused_decode(j == 1)
            outs[j].append(model.prefill(ids, cu, st, slots[live], starts))
        for i in live:
            done[i] += lens[i]
    model.enable_fused_decode(False)
    return outs, states


@pytest.mark.parametrize("mode", ["mlp", "linear", "none"])
@pytest.mark.parametrize("host_starts", [True, False], ids=["host_starts", "device_starts"])
def test_fused_prefill_matches_prefill_fp32(mode: str, host_starts: bool) -> None:
    """Fresh sequences of 1..17 tokens (shorter than the conv window too), then continued ones."""
    model = _model(mode, torch.float32)
    (ref, fused), (s0, s1) = _prefill_both(model, [(5, 1, 17, 2), (3, 9, 1, 0), (1, 2, 30, 4)],
                                           host_starts=host_starts)
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip([*s0.levels, *s0.conv, s0.positions], [*s1.levels, *s1.conv, s1.positions], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_prefill_matches_prefill_with_token_windows() -> None:
    """Windowed pools (levels 0..5 as raw tokens): chunks that end mid block, cross block boundaries
    and continue from the pool (the pooled initial state)."""
    model = _model("mlp", torch.float32)
    assert ModelState.allocate(model.config, 1, token_window=True).all_window is not None
    (ref, fused), (s0, s1) = _prefill_both(model, [(5, 1, 40, 2), (33, 9, 1, 0), (1, 30, 30, 31)],
                                           token_window=True)
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip([*s0.levels, *s0.all_window, s0.positions], [*s1.levels, *s1.all_window, s1.positions],
                    strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@MIXER_VARIANTS
def test_fused_prefill_matches_prefill_variants(overrides: dict) -> None:
    model = _model("mlp", torch.float32, **overrides)
    (ref, fused), _ = _prefill_both(model, [(6, 2), (4, 3)])
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_fused_prefill_with_bf16_state() -> None:
    model = _model("linear", torch.float32)
    (ref, fused), (s0, s1) = _prefill_both(model, [(7, 3), (2, 5)], state_dtype=torch.bfloat16)
    assert s1.levels[0].dtype == torch.bfloat16
    for a, b in zip(ref, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_prefill_rejects_wrong_host_starts() -> None:
    model = _model("mlp", torch.float32)
    st = ModelState.allocate(model.config, 2, model.device, model.dtype)
    with pytest.raises(ValueError, match="max_model_len"):
        model.prefill(torch.ones(3, dtype=torch.long), torch.tensor([0, 3]), st, torch.tensor([0]),
                      [model.config.max_model_len - 1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mlp", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_prefill_cuda_matches_prefill(mode: str, dtype: torch.dtype) -> None:
    """The fused prefill's Triton kernels on CUDA vs the op-by-op prefill: 6 sequences, 2 chunks each."""
    model = _model(mode, dtype, device="cuda", hidden_size=256, head_dim=64, state_size=128)
    (ref, fused), (s0, s1) = _prefill_both(model, [(1, 200, 3, 64, 700, 2), (130, 1, 2, 65, 33, 0)])
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(ref, fused, strict=True):
        assert ((b - a).norm() / a.norm()).item() < tol
    for a, b in zip([*s0.levels, *s0.conv], [*s1.levels, *s1.conv], strict=True):
        assert ((b.float() - a.float()).norm() / a.float().norm()).item() < tol
    assert torch.equal(s0.positions, s1.positions)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mlp", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("small", [False, True], ids=["cublas", "gemv"])
def test_fused_decode_cuda_matches_decode(mode: str, dtype: torch.dtype, small: bool) -> None:
    """3 rows: the GEMV path when ``small``, else the add+norm / cuBLAS path (forced)."""
    model = _model(mode, dtype, device="cuda", hidden_size=256, head_dim=64, state_size=128)
    model.small_batch_gemv = lambda h: small
    ref, fused, (s0, s1) = _decode_both(model, steps=40)
    err = ((fused - ref).norm() / ref.norm()).item()
    assert err < (1e-4 if dtype == torch.float32 else 2e-2), err
    for a, b in zip(s0.levels, s1.levels, strict=True):
        assert ((a - b).norm() / a.norm()).item() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.gpu
def test_fused_decode_cuda_tiles_and_partials() -> None:
    """40 rows of 32 heads: the tiled step (N * H >= 512) and its partial sums in the gated norm."""
    model = _model("mlp", torch.float32, device="cuda", hidden_size=512, head_dim=32, state_size=64)
    assert model.config.num_heads * 40 >= 512
    lens = tuple(1 + (7 * i) % 23 for i in range(40))
    ref, fused, (s0, s1) = _decode_both(model, steps=20, lens=lens)
    assert ((fused - ref).norm() / ref.norm()).item() < 1e-4
    for a, b in zip(s0.levels, s1.levels, strict=True):
        assert ((a - b).norm() / a.norm()).item() < 1e-4
