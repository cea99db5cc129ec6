"""Build a fresh model for training, and write a trained one as a complete model directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from fenwick_llm.engine.loader import load_model, save_model
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.tools.init import init_weights

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


def build_model(config: ModelConfig, device: torch.device, seed: int) -> LogLinearMamba2ForCausalLM:
    """A float32 model with the recipe's initialisation, on ``device``."""
    model = LogLinearMamba2ForCausalLM(config, device="cpu", dtype=torch.float32)
    init_weights(model, config.num_hidden_layers, seed=seed)
    return model.to(device)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def save_weights(model: LogLinearMamba2ForCausalLM, out_dir: Path, dtype: torch.dtype,
                 generation_config: dict[str, Any] | None = None) -> None:
    """config.json, model.safetensors in ``dtype`` (the model class keeps its small float32 parameters
    float32) and generation_config.json, through the engine's ``save_model``."""
    export = LogLinearMamba2ForCausalLM(model.config, device="cpu", dtype=dtype)
    export.load_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()})
    save_model(export, None, out_dir, generation_config=generation_config)


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def check_model_dir(out_dir: Path) -> None:
    """Reload the directory through the engine's loader; raises if it does not load."""
    model, _ = load_model(str(out_dir), device="cpu", dtype=torch.float32)
    del model
