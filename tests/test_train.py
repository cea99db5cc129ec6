"""The training recipe (tools/train.py) on CPU: data, tokenizer, training attention, a tiny run that
learns and writes a model directory the engine serves; and the bundled demo model."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.engine.tokenizer import Tokenizer
from fenwick_llm.kernels import naive
from fenwick_llm.tools import data
from fenwick_llm.tools.init import SOFTPLUS_INV_ONE
from fenwick_llm.tools.modeldir import build_model
from fenwick_llm.tools.train import main as train_main
from fenwick_llm.tools.train_attn import get_attention, quadratic_log_linear_attn, training_attention
from fenwick_llm.tools.trainer import TrainConfig, lr_at

from fenwick_llm import kernels

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "models" / "fenwick-shakespeare"

NAMES = ["ROMEO", "JULIET", "NURSE", "MERCUTIO"]
LINES = [
    "What light through yonder window breaks?",
    "The night is young and so are we.",
    "Good morrow, cousin, how fares the day?",
    "I will not stay, the hour is late.",
    "Speak again, bright angel, speak once more.",
    "A plague on both your houses, I am sped.",
]


def play_text(n_speeches: int = 160, seed: int = 0) -> str:
    rng = random.Random(seed)
    blocks = []
    for i in range(n_speeches):
        body = "\n".join(rng.choice(LINES) for _ in range(rng.randint(1, 2)))
        blocks.append(f"{NAMES[i % len(NAMES)]}:\n{body}")
    return "\n\n".join(blocks) + "\n"


TINY_FLAGS = ["--vocab-size", "300", "--hidden", "32", "--layers", "1", "--head-dim", "16",
              "--state-size", "8", "--lambda-levels", "8", "--seq-len", "32", "--batch-size", "8",
              "--steps", "30", "--warmup", "3", "--lr", "1e-2", "--dropout", "0", "--eval-every", "10",
              "--device", "cpu", "--sample-tokens", "0"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tiny_train")
    text = root / "play.txt"
    text.write_text(play_text())
    out = root / "model"
    torch.manual_seed(0)
    report = train_main(["--text", str(text), "--out", str(out), *TINY_FLAGS])
    return out, report


# ---- data ------------------------------------------------------------------------------------------------
def test_split_holds_out_the_tail() -> None:
    text = "abcdefghij" * 10
    train, val = data.split_text(text, 0.1)
    assert train + val == text and len(val) == 10 and val == text[-10:]
    with pytest.raises(ValueError):
        data.split_text(text, 0.0)


def test_tokenizer_is_lossless_with_special_tokens_first() -> None:
    text = play_text(40)
    tok = data.train_tokenizer(text, 300)
    assert [tok.token_to_id(t) for t in data.SPECIAL_TOKENS] == list(range(len(data.SPECIAL_TOKENS)))
    for s in (text[:500], "Ünïcödé 日本 🙂 tabs\tand  spaces\n"):
        assert tok.decode(data.encode(tok, s).tolist()) == s
    ids = data.encode(tok, data.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True))
    assert tok.token_to_id("<|user|>") in ids.tolist() and tok.token_to_id("<|assistant|>") in ids.tolist()


def test_chat_documents_alternate_roles_and_end_each_turn() -> None:
    docs = list(data.chat_documents(play_text(8), turns=4))
    assert len(docs) == 2
    assert docs[0].startswith("<|user|>\n") and docs[0].count(data.EOS) == 4
    assert docs[0].index("<|user|>") < docs[0].index("<|assistant|>")
    assert "ROMEO:" not in docs[0]  # speaker lines are dropped


def test_window_sampler_windows_are_shifted_slices() -> None:
    a, b = torch.arange(100), torch.arange(1000, 1050)
    sampler = data.WindowSampler([a, b], [0.5, 0.5], seq_len=8)
    x, y = sampler(64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 8)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.all(y - x == 1)
    assert {int(r[0]) >= 1000 for r in x} == {True, False}  # both streams drawn


def test_eval_windows_predict_every_token_but_the_first_once() -> None:
    stream = torch.arange(23)
    ys = torch.cat([y[0] for _, y in data.eval_windows(stream, 5)])
    assert torch.equal(ys, stream[1:])
    for x, y in data.eval_windows(stream, 5):
        assert torch.equal(x[0] + 1, y[0])


# ---- training attention and schedule ---------------------------------------------------------------------
def _attn_inputs(B=2, T=37, G=2, K=8, H=4, V=5, L=7, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    kw = dict(generator=gen, dtype=dtype)
    return (torch.randn(B, T, G, K, **kw), torch.randn(B, T, G, K, **kw), torch.randn(B, T, H, V, **kw),
            -torch.rand(B, T, H, **kw), torch.rand(B, T, H, L, **kw) + 0.5)


@pytest.mark.parametrize("T", [1, 16, 37], ids=lambda t: f"T{t}")
def test_quadratic_attention_matches_reference_values_and_gradients(T: int) -> None:
    inputs = _attn_inputs(T=T)
    ref_in = [x.clone().requires_grad_() for x in inputs]
    ours_in = [x.clone().requires_grad_() for x in inputs]
    ref = naive.log_linear_attn(*ref_in)
    ours = quadratic_log_linear_attn(*ours_in)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    (ref * w).sum().backward()
    (ours * w).sum().backward()
    for a, b in zip(ours_in, ref_in, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-8)


def test_quadratic_attention_refuses_too_few_levels() -> None:
    q, k, v, g, lam = _attn_inputs(T=40, L=6)  # positions up to 39 need 7 levels
    with pytest.raises(ValueError, match="levels"):
        quadratic_log_linear_attn(q, k, v, g, lam)
    with pytest.raises(ValueError, match="unknown training attention"):
        get_attention("flash")


def test_training_attention_routes_full_sequences_only_and_restores() -> None:
    original = kernels.chunk_log_linear_attn
    q, k, v, g, lam = (x.float() for x in _attn_inputs(T=20))
    with training_attention("quadratic"):
        assert kernels.chunk_log_linear_attn is not original
        o, st = kernels.chunk_log_linear_attn(q, k, v, g, lam)
        assert st is None
        _, st = kernels.chunk_log_linear_attn(q, k, v, g, lam, output_final_state=True)  # serving path kept
        assert st is not None and st.positions.tolist() == [20, 20]
    assert kernels.chunk_log_linear_attn is original
    torch.testing.assert_close(o, original(q, k, v, g, lam)[0], rtol=1e-4, atol=1e-4)


def test_model_forward_agrees_under_training_attention() -> None:
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=8,
                         lambda_mode="mlp", lambda_levels=8)
    model = build_model(config, torch.device("cpu"), seed=0).eval()
    x = torch.randint(0, 64, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x)
        with training_attention("quadratic"):
            ours = model(x)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_init_starts_adaptive_decay_at_one() -> None:
    config = ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, head_dim=16, state_size=8,
                         lambda_mode="mlp")
    model = build_model(config, torch.device("cpu"), seed=0)
    mlp = model.backbone.layers[0].mixer.lambda_mlp
    assert torch.all(mlp.fc2.weight == 0)
    torch.testing.assert_close(torch.nn.functional.softplus(mlp.fc2.bias), torch.ones_like(mlp.fc2.bias))
    assert math.isclose(math.log1p(math.exp(SOFTPLUS_INV_ONE)), 1.0)
    A = model.backbone.layers[0].mixer.A_log.exp()
    assert torch.allclose(A, torch.arange(1, config.num_heads + 1, dtype=A.dtype))


def test_lr_schedule_warms_up_then_decays_to_the_floor() -> None:
    cfg = TrainConfig(steps=100, batch_size=1, lr=1.0, min_lr_ratio=0.1, warmup=10)
    assert lr_at(0.0, 0, cfg) == pytest.approx(0.1)
    assert lr_at(0.1, 10, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    assert lr_at(1.0, 100, cfg) == pytest.approx(0.1)
    assert lr_at(0.5, 50, cfg) > lr_at(0.9, 90, cfg)


# ---- a tiny run end to end -------------------------------------------------------------------------------
def test_tiny_training_lowers_the_loss(tiny_run: tuple[Path, dict]) -> None:
    _, report = tiny_run
    losses = [r["loss"] for r in report["train_losses"]]
    assert losses[-1] < losses[0] - 0.5, losses
    evals = [e["val_loss"] for e in report["evals"]]
    assert min(evals) < evals[0] and report["heldout_loss_per_token"] < math.log(300)
    ratio = report["heldout_loss_per_token"] / report["heldout_nats_per_char"]
    assert ratio == pytest.approx(report["heldout_chars"] / report["tokens"]["heldout"])
    assert report["steps_run"] == 30
    assert report["command"].startswith("python -m fenwick_llm.tools.train --text")


def test_tiny_model_directory_is_complete(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json", "train_report.json"):
        assert (out / name).is_file(), name
    config = ModelConfig.from_file(out)
    assert config.lambda_mode == "mlp" and config.eos_token_id == 0 and config.vocab_size == 300
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 0 and 0 < gen["temperature"] <= 1
    tok = Tokenizer.from_dir(out)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who goes there?"}]
    assert tok.apply_chat_template(messages) == data.render_chat(messages, add_generation_prompt=True)
    assert tok.eos_token_id == 0


def test_tiny_model_serves_through_llm(tiny_run: tuple[Path, dict]) -> None:
    out, _ = tiny_run
    llm = LLM(str(out), device="cpu", max_num_seqs=2)
    ids = llm.get_tokenizer().encode("ROMEO:\n")
    outs = llm.generate(["ROMEO:\n", ids], SamplingParams(temperature=0, max_tokens=8))
    assert len(outs) == 2
    assert 1 <= len(outs[0].outputs[0].token_ids) <= 8
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids  # same prompt, text or ids


# ---- the bundled demo model ------------------------------------------------------------------------------
def test_bundled_model_loads_and_generates_on_cpu() -> None:
    assert (BUNDLED / "model.safetensors").is_file(), (
        f"{BUNDLED.relative_to(REPO)} is missing: train it with tools/train_all.sh (docs/training.md) and "
        "commit the model directory")
    assert (BUNDLED / "model.safetensors").stat().st_size <= 25 * 10**6
    assert ModelConfig.from_file(BUNDLED).lambda_mode == "mlp"
    llm = LLM(str(BUNDLED), device="cpu", max_num_seqs=2)
    chat = llm.get_tokenizer().apply_chat_template([{"role": "user", "content": "What news?"}])
    outs = llm.generate(["ROMEO:\n", chat], SamplingParams(temperature=0, max_tokens=24))
    text = outs[0].outputs[0].text
    assert len(outs[0].outputs[0].token_ids) == 24 and text.strip(), text
    assert outs[1].outputs[0].token_ids


@pytest.mark.gpu
def test_training_steps_on_cuda_with_bf16_autocast() -> None:
    from fenwick_llm.tools.trainer import train

    device = torch.device("cuda")
    config = ModelConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, head_dim=32, state_size=32,
                         lambda_mode="mlp")
    model = build_model(config, device, seed=0)
    pattern = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(0))
    sampler = data.WindowSampler([pattern.repeat(64).to(device)], [1.0], seq_len=256)  # learnable: repeats
    cfg = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup=4, eval_every=0, amp=True, dropout=0.1)
    with training_attention("quadratic"):
        res = train(model, sampler, cfg, device)
    assert res.steps_run == 40
    assert res.train_losses[-1][1] < res.train_losses[0][1] - 1.0, res.train_losses
