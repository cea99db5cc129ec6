"""Load and save model directories: config.json, model.safetensors (or a sharded index), the tokenizer.

Every failure names the path: a missing file raises ``ModelFileNotFoundError`` (a FileNotFoundError); an
unsupported config raises ``ConfigError`` and a checkpoint that does not fit the config raises
``CheckpointError`` (both ValueErrors), listing the weights or shapes at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import LogLinearMamba2ForCausalLM
from .model_config import ConfigError, ModelConfig
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "ConfigError", "ModelFileNotFoundError", "load_checkpoint",
           "load_generation_config", "load_model", "resolve_dtype", "save_model"]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"float32": torch.float32, "fp32": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_ALIASES = {"backbone.embedding.weight": "backbone.embeddings.weight"}  # older FLA / mamba checkpoints
_GEN_CONFIG_IGNORED = ("transformers_version", "_from_model_config")


class ModelFileNotFoundError(FileNotFoundError):
    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


class CheckpointError(ValueError):
    def __init__(self, message: str, path: Path) -> None:
        super().__init__(message)
        self.path = path


def resolve_dtype(dtype: torch.dtype | str, config_path: Path | None = None) -> torch.dtype:
    """torch dtype, a name ("bfloat16", "fp16", ...) or "auto" (the checkpoint's dtype, else float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported model dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        saved = {}
        if config_path is not None and config_path.is_file():
            saved = json.loads(config_path.read_text())
        name = str(saved.get("torch_dtype") or saved.get("dtype") or "float32")
    if name not in _DTYPES:
        raise ValueError(f"unsupported model dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def _weight_files(model_dir: Path) -> list[Path]:
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    index = model_dir / INDEX_FILE
    if not index.is_file():
        raise ModelFileNotFoundError(f"no weights in {model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} "
                                     "(only safetensors checkpoints are supported)", model_dir / SINGLE_FILE)
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e!r})", index) from None
    files = [model_dir / name for name in dict.fromkeys(weight_map.values())]
    for f in files:
        if not f.is_file():
            raise ModelFileNotFoundError(f"weight shard listed in {index} not found: {f}", f)
    return files


def _scan(files: list[Path]) -> dict[str, tuple[Path, str, list[int]]]:
    """Checkpoint key (after aliasing) -> (file, name in the file, shape), without reading tensors."""
    found: dict[str, tuple[Path, str, list[int]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for name in sf.keys():
                    found[_ALIASES.get(name, name)] = (f, name, list(sf.get_slice(name).get_shape()))
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise CheckpointError(f"{f}: cannot read safetensors file ({e})", f) from None
    return found


def load_checkpoint(model_dir: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype | str = torch.float32) -> LogLinearMamba2ForCausalLM:
    """The model alone, weights checked by name and shape against the config."""
    model_dir = Path(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelFileNotFoundError(f"model config not found: {config_path}", config_path)
    config = ModelConfig.from_file(config_path)
    dtype = resolve_dtype(dtype, config_path)
    files = _weight_files(model_dir)
    found = _scan(files)

    model = LogLinearMamba2ForCausalLM(config, device="meta", dtype=dtype)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(k for k in expected if k not in found and k not in optional)
    unexpected = sorted(found[k][1] for k in found if k not in expected)
    where = files[0] if len(files) == 1 else model_dir / INDEX_FILE
    if missing or unexpected:
        parts = [f"missing weights: {', '.join(missing)}"] if missing else []
        parts += [f"unexpected weights: {', '.join(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{where} does not match the config (lambda_mode={config.lambda_mode!r}, "
                              f"{config.num_hidden_layers} layers): " + "; ".join(parts), where)
    for key, (f, name, shape) in found.items():
        if shape != expected[key]:
            raise CheckpointError(f"{f}: weight {name} has shape {tuple(shape)} but the config expects "
                                  f"{tuple(expected[key])}", f)

    model.to_empty(device=device)
    model.tie_weights()
    params = model.state_dict()  # shares storage with the parameters
    by_file: dict[Path, list[str]] = {}
    for key, (f, _, _) in found.items():
        if key not in optional:  # a tied lm_head.weight is the embedding, loaded under its own name
            by_file.setdefault(f, []).append(key)
    with torch.no_grad():
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as sf:
                for key in keys:
                    params[key].copy_(sf.get_tensor(found[key][1]))
    return model.eval()


def load_model(model_dir: str | Path, device: torch.device | str = "cpu",
               dtype: torch.dtype | str = torch.float32) -> tuple[LogLinearMamba2ForCausalLM, Tokenizer]:
    """(model, tokenizer) from a model directory; dtype float32 / bfloat16 / float16 or "auto"."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileNotFoundError(f"model directory not found: {model_dir}", model_dir)
    model = load_checkpoint(model_dir, device=device, dtype=dtype)
    tok_path = model_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ModelFileNotFoundError(f"tokenizer not found: {tok_path}", tok_path)
    return model, Tokenizer.from_dir(model_dir)


def load_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """Default sampling settings from generation_config.json ({} when absent)."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})", path) from None
    return {k: v for k, v in d.items() if k not in _GEN_CONFIG_IGNORED}


def save_model(model: LogLinearMamba2ForCausalLM, tokenizer: Tokenizer | None, out_dir: str | Path, *,
               generation_config: dict[str, Any] | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write a model directory that ``load_model`` (and, in linear mode with 15 levels, FLA) reads.

    ``max_shard_bytes`` splits the weights into shards with a ``model.safetensors.index.json``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in tensors.items():
        nbytes = v.numel() * v.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out_dir / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(v.numel() * v.element_size() for v in tensors.values())
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": weight_map}, indent=2))
    if tokenizer is not None:
        tokenizer.save(out_dir)
    if generation_config is not None:
        (out_dir / "generation_config.json").write_text(json.dumps(generation_config, indent=2))
    return out_dir
