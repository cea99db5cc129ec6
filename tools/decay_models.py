"""The model variants of the adaptive-decay study (docs/adaptive-decay.md): the three λ modes the engine
serves, and the ablations of the λ-MLP (hidden size; a softmax over levels instead of softplus).

The softmax variant is a training-side model only: its checkpoint would carry the λ-MLP's names
(``mixer.lambda_mlp.fc1/fc2``) and the engine would serve it as softplus, so it is never written as a
model directory and is evaluated through its own forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.tools.modeldir import build_model
from torch import nn


@dataclass(frozen=True)
class Variant:
    name: str
    lambda_mode: str  # "mlp", "linear" or "none"
    mlp_hidden: int = 64  # λ-MLP hidden size (mlp only)
    softmax: bool = False  # λ = L · softmax over levels of the λ-MLP's output, instead of softplus

    @property
    def servable(self) -> bool:
        """Whether the engine computes this variant's λ (everything but the softmax ablation)."""
        return not self.softmax


VARIANTS = {v.name: v for v in (
    Variant("mlp", "mlp"),
    Variant("linear", "linear"),
    Variant("none", "none"),
    Variant("mlp-h8", "mlp", mlp_hidden=8),
    Variant("mlp-h256", "mlp", mlp_hidden=256),
    Variant("mlp-softmax", "mlp", softmax=True),
)}
MAIN_VARIANTS = ("mlp", "linear", "none")
ABLATIONS = ("mlp-h8", "mlp-h256", "mlp-softmax")


@dataclass(frozen=True)
class Shape:
    """The backbone shared by every variant of a task."""

    hidden: int = 128
    layers: int = 2
    head_dim: int = 64  # V; value heads = 2 * hidden / head_dim
    state_size: int = 64  # K
    lambda_levels: int = 15  # 2^(L-1) positions: the longest evaluation must fit

    def config(self, variant: Variant, vocab_size: int) -> ModelConfig:
        return ModelConfig(vocab_size=vocab_size, hidden_size=self.hidden, num_hidden_layers=self.layers,
                           head_dim=self.head_dim, state_size=self.state_size,
                           lambda_mode=variant.lambda_mode, lambda_mlp_hidden=variant.mlp_hidden,
                           lambda_levels=self.lambda_levels, tie_word_embeddings=False,
                           bos_token_id=0, eos_token_id=0, pad_token_id=0)


class SoftmaxLambda(nn.Module):
    """λ = L · softmax over levels of fc2(GELU(fc1(dl))): the levels share a fixed total of L (the mean
    λ is 1), so raising one level lowers the others. fc2 starts at zero, so λ ≡ 1 at initialisation,
    as the softplus λ-MLP starts."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2
        with torch.no_grad():
            self.fc2.weight.zero_()
            self.fc2.bias.zero_()

    def forward(self, dl: torch.Tensor) -> torch.Tensor:
        """dl: [..., H, L] -> λ: [..., H, L] float32."""
        logits = self.fc2(F.gelu(self.fc1(dl.float())))
        return logits.shape[-1] * torch.softmax(logits, dim=-1)


def _lambda_mlps(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every ``*.lambda_mlp`` (the checkpoint's names, DESIGN §2)."""
    found = []
    for name, mod in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if leaf == "lambda_mlp":
            found.append((model.get_submodule(parent), leaf, mod))
    return found


def build(variant: Variant, shape: Shape, vocab_size: int, device: torch.device, seed: int) -> nn.Module:
    """A freshly initialised model of ``variant`` (tools/init.py's scheme) on ``device``.

    Every variant gets the same backbone at one seed (the weights of the λ ≡ 1 model; the λ parameters
    start as tools/init.py sets them), so that paired comparisons differ in λ only: left alone, the
    λ-MLP's weights would draw from the initialisation's random stream and shift every later weight.
    """
    model = build_model(shape.config(variant, vocab_size), device, seed)
    if variant.lambda_mode != "none":
        base = build_model(shape.config(VARIANTS["none"], vocab_size), device, seed)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        own = [k for k in missing if ".lambda_mlp." not in k and not k.endswith(".L")]
        if own or unexpected:
            raise RuntimeError(f"backbone mismatch between λ modes: missing {own}, unexpected {unexpected}")
    if variant.softmax:
        mlps = _lambda_mlps(model)
        if not mlps:
            raise RuntimeError("the model has no lambda_mlp modules to turn into a softmax over levels")
        for parent, attr, mod in mlps:
            setattr(parent, attr, SoftmaxLambda(mod.fc1, mod.fc2))
        check_softmax_in_use(model)
    return model


def check_softmax_in_use(model: nn.Module) -> None:
    """Raise unless a forward of ``model`` calls every SoftmaxLambda (the mixer computes λ through it)."""
    mods = [m for m in model.modules() if isinstance(m, SoftmaxLambda)]
    calls: list[int] = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in mods]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 4, dtype=torch.int64, device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    if len(calls) != len(mods):
        raise RuntimeError(f"the model's forward called {len(calls)} of {len(mods)} softmax λ modules: the "
                           "mixer no longer computes λ through mixer.lambda_mlp")
