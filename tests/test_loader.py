"""Model directories: loading in each dtype, sharded indexes, and a clear error for every way it can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from fenwick_llm.engine.loader import (
    CheckpointError,
    ConfigError,
    ModelFileNotFoundError,
    load_checkpoint,
    load_generation_config,
    load_model,
    save_model,
)
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.engine.tokenizer import ChatTemplateError, Tokenizer
from safetensors.torch import load_file, save_file


@pytest.fixture
def model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


IDS = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 8, 9, 10, 11]])


def test_load_fp32_and_roundtrip(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(tiny_model_dir)
    assert model.config.lambda_mode == "mlp" and model.dtype == torch.float32
    raw = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(raw) == set(model.state_dict())
    for name, t in model.state_dict().items():
        assert torch.equal(t, raw[name]), name
    save_model(model, tok, tmp_path / "again")
    again, _ = load_model(tmp_path / "again")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS), model(IDS), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bfloat16", "auto"], ids=str)
def test_load_low_precision(tiny_model_dir: Path, dtype) -> None:
    ref, _ = load_model(tiny_model_dir)
    model, _ = load_model(tiny_model_dir, dtype=dtype)
    want = torch.float32 if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype
    assert model.dtype == want
    assert model.backbone.layers[0].mixer.in_proj.weight.dtype == want
    assert model.backbone.norm_f.weight.dtype == torch.float32  # norms stay float32, as in FLA
    assert model.backbone.layers[1].mixer.A_log.dtype == torch.float32
    with torch.no_grad():
        out, expected = model(IDS), ref(IDS)
    assert out.dtype == want and rel_err(out.float(), expected) < 5e-2


def test_sharded_index(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(tiny_model_dir)
    out = save_model(model, tok, tmp_path / "sharded", max_shard_bytes=60_000)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    loaded, _ = load_model(out)
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
    shards[1].unlink()
    with pytest.raises(ModelFileNotFoundError, match=shards[1].name) as err:
        load_model(out)
    assert err.value.path == shards[1]


def test_tied_embeddings(tmp_path: Path) -> None:
    from tiny import make_tiny_model

    path = make_tiny_model(tmp_path / "tied", lambda_mode="linear", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    model, _ = load_model(path)
    assert model.lm_head.weight is model.backbone.embeddings.weight
    torch.testing.assert_close(model.lm_head.weight, load_file(str(path / "model.safetensors"))[
        "backbone.embeddings.weight"])


def test_missing_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelFileNotFoundError, match="nowhere"):
        load_model(tmp_path / "nowhere")
    for name, pattern in [("config.json", "config.json"), ("model.safetensors", "model.safetensors"),
                          ("tokenizer.json", "tokenizer.json")]:
        path = Path(shutil.copytree(tiny_model_dir, tmp_path / name))
        (path / name).unlink()
        with pytest.raises(FileNotFoundError, match=pattern) as err:
            load_model(path)
        assert str(path) in str(err.value)


@pytest.mark.parametrize("changes,pattern", [
    (dict(model_type="mamba2"), "model_type 'mamba2' is not supported"),
    (dict(residual_in_fp32=True), "residual_in_fp32"),
    (dict(attnres_block_size=4), "attnres_block_size"),
    (dict(dt_limit=[0.0, 10.0]), "dt_limit"),
    (dict(lambda_mode="softmax"), "lambda_mode"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=48), "multiple of head_dim"),
    (dict(num_heads=3), "num_heads=3"),
    (dict(max_model_len=1 << 20), "max_model_len"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_config_errors(model_copy: Path, changes: dict, pattern: str) -> None:
    edit_config(model_copy, **changes)
    with pytest.raises(ConfigError, match=pattern) as err:
        load_model(model_copy)
    assert str(model_copy / "config.json") in str(err.value)
    assert isinstance(err.value, ValueError)


def test_shape_mismatch(model_copy: Path) -> None:
    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    tensors["backbone.layers.1.mixer.A_log"] = torch.zeros(3)
    save_file(tensors, str(path))
    pattern = r"backbone.layers.1.mixer.A_log has shape \(3,\) but the config expects \(8,\)"
    with pytest.raises(CheckpointError, match=pattern) as err:
        load_model(model_copy)
    assert err.value.path == path


def test_missing_and_unexpected_weights(model_copy: Path) -> None:
    path = model_copy / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["backbone.layers.0.mlp.up_proj.weight"]
    tensors["backbone.layers.0.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError) as err:
        load_model(model_copy)
    msg = str(err.value)
    assert "missing weights: backbone.layers.0.mlp.up_proj.weight" in msg
    assert "unexpected weights: backbone.layers.0.extra.weight" in msg and str(path) in msg


def test_lambda_mode_mismatch_names_the_weights(model_copy: Path) -> None:
    """An adaptive-decay checkpoint read with a linear config: L is missing, lambda_mlp is unexpected."""
    edit_config(model_copy, lambda_mode="linear")
    pattern = (r"missing weights: backbone.layers.0.mixer.L.*"
               r"unexpected weights: backbone.layers.0.mixer.lambda_mlp.fc1.bias")
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(model_copy)


def test_generation_config(tiny_model_dir: Path, tmp_path: Path) -> None:
    gen = load_generation_config(tiny_model_dir)
    tok = Tokenizer.from_dir(tiny_model_dir)
    assert gen["eos_token_id"] == tok.eos_token_id
    assert load_generation_config(tmp_path) == {}


def test_tokenizer(tiny_model_dir: Path) -> None:
    tok = Tokenizer.from_dir(tiny_model_dir)
    config = ModelConfig.from_file(tiny_model_dir)
    assert tok.vocab_size == config.vocab_size and tok.eos_token_id == config.eos_token_id
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id in tok.all_special_ids
    text = "Hello, world! Café 日本語 🙂"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode([*ids, tok.eos_token_id]) == text
    assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=False) == text + "<|endoftext|>"
    assert tok.id_to_token(tok.eos_token_id) == "<|endoftext|>"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|user|>\nhi<|endoftext|>\n<|assistant|>\n"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False) == \
        "<|user|>\nhi<|endoftext|>\n"
    with pytest.raises(ChatTemplateError, match="unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="chat template"):
        tok.apply_chat_template([], chat_template="{% for %}")


def test_tokenizer_plain_fallback_template(model_copy: Path) -> None:
    cfg_path = model_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(model_copy)
    assert tok.chat_template is None
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages) == "<|system|>\nBe brief.\n<|user|>\nhi\n<|assistant|>\n"


def test_tokenizer_add_bos_token(model_copy: Path) -> None:
    cfg_path = model_copy / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(bos_token="<|system|>", add_bos_token=True)
    cfg_path.write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(model_copy)
    bos = tok.token_to_id("<|system|>")
    assert tok.bos_token_id == bos
    assert tok.encode("hi")[0] == bos and tok.encode("hi", add_special_tokens=False)[0] != bos
    assert tok.apply_chat_template([{"role": "user", "content": "x"}], chat_template="{{ bos_token }}") == \
        "<|system|>"
