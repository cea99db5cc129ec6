"""The model's prefill and decode (engine/model.py: the fused ops of ``kernels``, residual adds inside
the norms, one GEMM for gate and up) against its full forward, on the mixer's configurations.

On the CPU the fused ops run their PyTorch references, so this checks the wiring: which tensors go
where, the residual adds folded into the norms, the fused gate/up weight, the small-batch GEMV
composition. The Triton kernels are compared with those references in their own tests; the GPU tests
here run the whole prefill and decode on CUDA.
"""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.model_state import ModelState
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


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(model: LogLinearMamba2ForCausalLM, chunks: list[tuple[int, ...]], steps: int = 4,
         state_dtype: torch.dtype = torch.float32, token_window: bool = True, host_starts: bool = True,
         gemv: bool = False) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], ModelState]:
    """Prefill len(chunks[0]) sequences chunk after chunk (the first from empty slots, the rest
    continuing from the pool; a 0 length skips that sequence), then decode ``steps`` tokens for all of
    them (through the GEMVs, as for a few rows on CUDA, when ``gemv``). Returns (logits, the full
    forward's logits at the same positions) per call, and the pool."""
    if gemv:
        model.small_batch_gemv = lambda h: True
    dev, cfg, n = model.device, model.config, len(chunks[0])
    state = ModelState.allocate(cfg, 2 * n + 1, dev, model.dtype, state_dtype=state_dtype,
                                token_window=token_window)
    gen = torch.Generator().manual_seed(2)
    slots = torch.randperm(2 * n + 1, generator=gen)[:n].to(dev)
    total = [sum(c[i] for c in chunks) + steps for i in range(n)]
    seqs = [torch.randint(1, cfg.vocab_size, (t,), generator=gen).to(dev) for t in total]
    with torch.no_grad():
        full = [model(s[None])[0].float() for s in seqs]
    done = [0] * n
    calls = []
    for lens in chunks:
        live = [i for i, m in enumerate(lens) if m]
        ids = torch.cat([seqs[i][done[i]:done[i] + lens[i]] for i in live])
        cu = torch.tensor([0, *torch.tensor([lens[i] for i in live]).cumsum(0).tolist()])
        starts = [done[i] for i in live] if host_starts else None
        logits = model.prefill(ids, cu, state, slots[live], starts)
        for i in live:
            done[i] += lens[i]
        calls.append((logits, torch.stack([full[i][done[i] - 1] for i in live])))
    for _ in range(steps):
        ids = torch.stack([seqs[i][done[i]] for i in range(n)])
        logits = model.decode(ids, state, slots)
        calls.append((logits, torch.stack([full[i][done[i]] for i in range(n)])))
        done = [d + 1 for d in done]
    assert state.positions[slots].tolist() == done
    return calls, state


@pytest.mark.parametrize("mode", ["mlp", "linear", "none"])
@pytest.mark.parametrize("host_starts", [True, False], ids=["host_starts", "device_starts"])
def test_prefill_and_decode_match_forward(mode: str, host_starts: bool) -> None:
    """Fresh sequences of 1..17 tokens (shorter than the conv state too), then continued ones, then
    decodes; windowed pools (levels 0..5 as raw tokens): chunks end mid block and cross blocks."""
    model = _model(mode, torch.float32)
    calls, state = _run(model, [(5, 1, 40, 2), (33, 9, 1, 0), (1, 30, 30, 31)], host_starts=host_starts)
    assert state.all_window is not None
    for got, ref in calls:
        assert _rel(got, ref) < 1e-4


def test_prefill_and_decode_on_a_pool_of_blocks() -> None:
    """A pool without a token window (every level a block, deferred decay): the same results."""
    model = _model("mlp", torch.float32)
    calls, state = _run(model, [(5, 1, 17), (3, 9, 1)], token_window=False)
    assert state.all_window is None
    for got, ref in calls:
        assert _rel(got, ref) < 1e-4


@pytest.mark.parametrize("mode", ["mlp", "linear"])
def test_gemv_decode_path_matches_forward(mode: str) -> None:
    model = _model(mode, torch.float32)
    model.fuse_gate_up()
    calls, _ = _run(model, [(5, 1, 17)], steps=6, gemv=True)
    for got, ref in calls:
        assert _rel(got, ref) < 1e-4


@MIXER_VARIANTS
def test_prefill_and_decode_match_forward_variants(overrides: dict) -> None:
    model = _model("mlp", torch.float32, **overrides)
    for got, ref in _run(model, [(6, 2), (4, 3)], steps=3)[0]:
        assert _rel(got, ref) < 1e-4


def test_bf16_model_close() -> None:
    model = _model("mlp", torch.bfloat16)
    for got, ref in _run(model, [(9, 3)], steps=3)[0]:
        assert _rel(got, ref) < 3e-2


def test_bf16_state_close() -> None:
    model = _model("linear", torch.float32)
    calls, state = _run(model, [(7, 3), (2, 5)], state_dtype=torch.bfloat16)
    assert state.levels[0].dtype == torch.bfloat16
    for got, ref in calls:
        assert _rel(got, ref) < 1e-2


def test_fuse_gate_up_keeps_names_and_values() -> None:
    model = _model("mlp", torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, model.config.hidden_size)
    mlp = model.backbone.layers[0].mlp
    unfused = mlp.forward_fused(x)
    model.fuse_gate_up()
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert mlp.gate_proj.weight.data_ptr() == mlp.gate_up_weight.data_ptr()
    torch.testing.assert_close(mlp.forward_fused(x), unfused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mlp.forward_fused(x), mlp(x), rtol=1e-5, atol=1e-6)


def test_prefill_rejects_wrong_host_starts() -> None:
    model = _model("mlp", torch.float32)
    st = ModelState.allocate(model.config, 2, model.device, model.dtype)
    with pytest.raises(ValueError, match="max_model_len"):
        model.prefill(torch.ones(3, dtype=torch.long), torch.tensor([0, 3]), st, torch.tensor([0]),
                      [model.config.max_model_len - 1])


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["mlp", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("gemv", [False, True], ids=["cublas", "gemv"])
def test_prefill_and_decode_cuda_match_forward(mode: str, dtype: torch.dtype, gemv: bool) -> None:
    """The Triton kernels on CUDA: 6 sequences, 2 chunks each (long ones, from odd positions), then 20
    decodes of 6 rows (the GEMV path forced when ``gemv``, else add+norm and cuBLAS)."""
    model = _model(mode, dtype, device="cuda", hidden_size=256, head_dim=64, state_size=128)
    model.fuse_gate_up()
    if not gemv:
        model.small_batch_gemv = lambda h: False
    calls, _ = _run(model, [(1, 200, 3, 64, 700, 2), (130, 1, 2, 65, 33, 1)], steps=20, gemv=gemv)
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    for got, ref in calls:
        assert _rel(got, ref) < tol


@pytest.mark.gpu
def test_decode_cuda_many_rows_match_forward() -> None:
    """40 rows of 16 heads on CUDA (one program per head and V tile at N * H >= 128)."""
    model = _model("mlp", torch.float32, device="cuda", hidden_size=512, head_dim=32, state_size=64)
    assert model.config.num_heads * 40 >= 128
    lens = tuple(1 + (7 * i) % 23 for i in range(40))
    for got, ref in _run(model, [lens], steps=20)[0]:
        assert _rel(got, ref) < 1e-3
