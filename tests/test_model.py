"""The model's three paths agree: forward == token-by-token decode == chunked varlen prefill + decode."""

from __future__ import annotations

import pytest
import torch
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.engine.model_state import ModelState
from tiny import randomize_, tiny_config

MODES = ["linear", "mlp", "none"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def make_model(mode: str = "mlp", seed: int = 0, **overrides) -> LogLinearMamba2ForCausalLM:
    torch.manual_seed(seed)
    model = LogLinearMamba2ForCausalLM(tiny_config(mode, **overrides))
    randomize_(model)
    return model.eval()


def tokens(model: LogLinearMamba2ForCausalLM, *shape: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, shape, generator=gen)


def nan_pool(config: ModelConfig, num_slots: int) -> ModelState:
    """A pool whose every slot holds NaN; the test resets the slots it uses, so leaks show."""
    state = ModelState.allocate(config, num_slots)
    for t in (*state.levels, *state.conv):
        t.fill_(float("nan"))
    state.positions.fill_(12345)
    return state


@pytest.mark.parametrize("mode", MODES)
def test_forward_equals_decode(mode: str) -> None:
    model = make_model(mode)
    ids = tokens(model, 2, 41)
    with torch.no_grad():
        ref = model(ids)
    state = nan_pool(model.config, 5)
    slots = torch.tensor([4, 1])
    state.reset(slots)
    out = torch.stack([model.decode(ids[:, t], state, slots) for t in range(ids.shape[1])], 1)
    assert rel_err(out, ref) < 1e-4
    assert state.positions[slots].tolist() == [41, 41]


@pytest.mark.parametrize("overrides", [
    dict(D_has_hdim=True), dict(n_groups=2), dict(norm_before_gate=True), dict(rmsnorm=False),
    dict(use_bias=True, use_conv_bias=False), dict(tie_word_embeddings=True), dict(conv_kernel=2),
    dict(lambda_levels=7),
], ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_forward_equals_decode_variants(overrides: dict) -> None:
    model = make_model("mlp", **overrides)
    ids = tokens(model, 1, 23)
    with torch.no_grad():
        ref = model(ids)
    state = ModelState.allocate(model.config, 2)
    slots = torch.tensor([1])
    out = torch.stack([model.decode(ids[:, t], state, slots) for t in range(ids.shape[1])], 1)
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("mode", MODES)
def test_chunked_varlen_prefill_then_decode(mode: str) -> None:
    """Three sequences prefilled in uneven chunks, joining at different steps, then decoded together."""
    model = make_model(mode, seed=3)
    lengths = [45, 30, 110]
    seqs = [tokens(model, n, seed=10 + i) for i, n in enumerate(lengths)]
    with torch.no_grad():
        refs = [model(s[None])[0] for s in seqs]
    state = nan_pool(model.config, 8)
    slots = [6, 2, 4]
    state.reset(slots)
    untouched = [i for i in range(8) if i not in slots]
    # (sequence, number of new tokens) per prefill step: odd sizes, shorter and longer than conv_kernel,
    # the last one crossing a 64-token chunk boundary from an unaligned position.
    schedule = [[(0, 5), (1, 1)], [(1, 2), (0, 13), (2, 3)], [(2, 30), (1, 1)], [(0, 20), (1, 19), (2, 1)],
                [(2, 70)]]
    done = [0, 0, 0]
    for step in schedule:
        ids = torch.cat([seqs[i][done[i]:done[i] + n] for i, n in step])
        cu = torch.tensor([0] + [n for _, n in step]).cumsum(0)
        logits = model.prefill(ids, cu, state, torch.tensor([slots[i] for i, _ in step]))
        for row, (i, n) in enumerate(step):
            done[i] += n
            assert rel_err(logits[row], refs[i][done[i] - 1]) < 1e-4, (step, i)
    assert state.positions[slots].tolist() == done
    while done != lengths:
        active = [i for i in range(3) if done[i] < lengths[i]]
        ids = torch.stack([seqs[i][done[i]] for i in active])
        logits = model.decode(ids, state, torch.tensor([slots[i] for i in active]))
        for row, i in enumerate(active):
            assert rel_err(logits[row], refs[i][done[i]]) < 1e-4
            done[i] += 1
    for t in (*state.levels, *state.conv):
        assert t[untouched].isnan().all()
    assert (state.positions[untouched] == 12345).all()


def test_fork_with_copy() -> None:
    """n > 1: prefill a prompt once, fork the slot, continue each copy with its own tokens."""
    model = make_model("mlp", seed=5)
    prompt = tokens(model, 19, seed=2)
    conts = tokens(model, 3, 6, seed=3)
    with torch.no_grad():
        refs = model(torch.cat([prompt.expand(3, -1), conts], 1))
    state = ModelState.allocate(model.config, 6)
    logits = model.prefill(prompt, torch.tensor([0, 19]), state, torch.tensor([1]))
    assert rel_err(logits[0], refs[0, 18]) < 1e-4
    state.copy_(1, torch.tensor([3, 5]))
    slots = torch.tensor([1, 3, 5])
    assert state.positions[slots].tolist() == [19, 19, 19]
    for t in range(conts.shape[1]):
        logits = model.decode(conts[:, t], state, slots)
        assert rel_err(logits, refs[:, 19 + t]) < 1e-4


def test_state_reset_and_sizes() -> None:
    config = tiny_config("mlp")
    state = ModelState.allocate(config, 4, state_dtype=torch.bfloat16, token_window=False)
    c = config
    level_bytes = c.lambda_levels * c.num_heads * c.state_size * c.head_dim * 2
    conv_bytes = c.conv_dim * (c.conv_kernel - 1) * 4
    decay_bytes = 2 * c.lambda_levels * c.num_heads * 4
    assert state.bytes_per_slot == c.num_hidden_layers * (level_bytes + conv_bytes + decay_bytes) + 8
    assert state.nbytes == 4 * state.bytes_per_slot
    assert state.levels[0].shape == (4, c.lambda_levels, c.num_heads, c.state_size, c.head_dim)
    assert state.conv[1].shape == (4, c.conv_dim, c.conv_kernel - 1)
    assert state.decay[1].shape == (4, 2, c.lambda_levels, c.num_heads)
    for t in (*state.levels, *state.conv, *state.decay):
        t.fill_(1.0)
    state.positions.fill_(7)
    state.reset([0, 2])
    assert state.levels[0][[0, 2]].abs().sum() == 0 and state.conv[1][[0, 2]].abs().sum() == 0
    assert state.decay[1][[0, 2]].abs().sum() == 0 and state.decay[1][[1, 3]].min() == 1
    assert state.levels[0][[1, 3]].min() == 1 and state.positions.tolist() == [0, 7, 0, 7]
    state.reset([1], levels=False)  # for a prefill that rewrites the levels: the rest is zeroed
    assert state.levels[0][1].min() == 1
    assert state.conv[0][1].abs().sum() == state.decay[0][1].abs().sum() == 0
    short = ModelState.allocate(config, 2, num_levels=ModelState.levels_for(config, 100), token_window=False)
    assert short.num_levels == 8 and short.levels[0].shape[1] == short.decay[0].shape[2] == 8
    with pytest.raises(ValueError, match="num_levels"):
        ModelState.allocate(config, 2, num_levels=c.lambda_levels + 1)
    meta = ModelState.allocate(config, 3, device="meta")
    assert meta.bytes_per_slot == ModelState.allocate(config, 1).bytes_per_slot


def test_prefill_batch_is_one_buffer_with_each_part_on_16_bytes() -> None:
    """prefill == prefill_batch + run_prefill; the batch's parts are views of one upload, each starting
    16-byte aligned (Triton compiles per pointer alignment), and starts are read back when not given."""
    model = make_model("mlp")
    cu = torch.tensor([0, 5, 12])
    a, b = ModelState.allocate(model.config, 3), ModelState.allocate(model.config, 3)
    slots, ids = torch.tensor([2, 0]), tokens(model, 12)
    with torch.no_grad():
        want = model.prefill(ids, cu, a, slots, [0, 0])
        batch = model.prefill_batch(ids.tolist(), [2, 0], [0, 0], [5, 7], b)
        assert not batch.continuing and batch.lens.tolist() == [5, 7] and batch.starts.tolist() == [0, 0]
        assert batch.cu.tolist() == [0, 5, 12] and batch.slots.tolist() == [2, 0]
        base = batch.ids.untyped_storage().data_ptr()
        parts = [batch.ids, batch.slots, batch.cu, batch.lens, batch.starts, *batch.window.rows]
        assert all(t.untyped_storage().data_ptr() == base and (t.data_ptr() - base) % 16 == 0 for t in parts)
        got = model.run_prefill(batch, b)
        assert torch.equal(got, want)
        more = model.prefill(tokens(model, 4), torch.tensor([0, 3, 4]), b, slots)  # starts read back
        assert more.shape == (2, model.config.vocab_size) and b.positions[slots].tolist() == [8, 8]
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.prefill(ids[:11], cu, b, slots, [0, 0])


def test_bf16_state_and_model_close_to_fp32() -> None:
    model = make_model("mlp", seed=7)
    ids = tokens(model, 1, 33)
    with torch.no_grad():
        ref = model(ids)
    state = ModelState.allocate(model.config, 1, state_dtype=torch.bfloat16)
    out = torch.stack([model.decode(ids[:, t], state, torch.tensor([0])) for t in range(33)], 1)
    assert rel_err(out, ref) < 2e-2
    bf16 = make_model("mlp", seed=7).to(torch.bfloat16)
    for name, p in bf16.named_parameters():  # norms and small parameters stay float32 in a loaded model
        if p.dim() == 1 or ".L" in name or "lambda_mlp" in name:
            p.data = dict(model.named_parameters())[name].data.clone()
    with torch.no_grad():
        out = bf16(ids)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 5e-2


def test_length_limits() -> None:
    model = make_model("none", lambda_levels=4)  # max_model_len = 2^3 = 8
    assert model.config.max_model_len == 8
    state = ModelState.allocate(model.config, 2)
    model.prefill(tokens(model, 6), torch.tensor([0, 6]), state, torch.tensor([0]))
    with pytest.raises(ValueError, match="max_model_len"):
        model.prefill(tokens(model, 3), torch.tensor([0, 3]), state, torch.tensor([0]))
    with pytest.raises(ValueError, match="max_model_len"):
        model(tokens(model, 1, 9))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model.prefill(tokens(model, 3), torch.tensor([0, 2]), state, torch.tensor([1]))


@pytest.mark.parametrize("mode", MODES)
def test_state_dict_names(mode: str) -> None:
    names = set(make_model(mode).state_dict())
    per_layer = {"mixer_norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
                 "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight",
                 "mlp_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    per_layer |= {"linear": {"mixer.L"}, "none": set(),
                  "mlp": {f"mixer.lambda_mlp.fc{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}}[mode]
    expected = {"backbone.embeddings.weight", "backbone.norm_f.weight", "lm_head.weight"}
    expected |= {f"backbone.layers.{i}.{n}" for i in range(2) for n in per_layer}
    assert names == expected


def test_mlp_lambda_initialises_to_one() -> None:
    model = LogLinearMamba2ForCausalLM(tiny_config("mlp"))
    dl = torch.randn(5, model.config.num_heads * model.config.lambda_levels)
    lam = model.backbone.layers[0].mixer._level_scales(dl)
    torch.testing.assert_close(lam, torch.ones_like(lam))


def test_decode_has_no_host_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under FakeTensorMode every .item() / .tolist() / data-dependent branch raises; the step kernel is
    stubbed (it is the kernels package's own contract), the rest of decode must run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fenwick_llm import kernels

    def step_stub(q, k, v, g, level_scales, levels, slots, positions, scale=None, **kw):
        levels[slots] = levels[slots] * torch.exp(g)[:, None, :, None, None]
        return v * level_scales.sum(-1, keepdim=True)

    def window_stub(q, k, v, g, level_scales, levels, level_decay, window, slots, positions, scale=None):
        return step_stub(q, k, v, g, level_scales, levels, slots, positions)

    monkeypatch.setattr(kernels, "fused_recurrent_step", step_stub)
    monkeypatch.setattr(kernels, "window_step", window_stub)
    model = make_model("mlp")
    config = model.config
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        state = ModelState.allocate(config, 4)
        slots = mode.from_tensor(torch.tensor([2, 0]))
        ids = mode.from_tensor(torch.tensor([5, 6]))
        logits = model.decode(ids, state, slots)
    assert logits.shape == (2, config.vocab_size)
