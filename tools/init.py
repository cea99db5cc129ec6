"""The recipe's weight initialisation: FLA's `LogLinearMamba2PreTrainedModel._init_weights`, by name
(except conv1d, which keeps PyTorch's default as in mamba_ssm).

Applied to a freshly built model so that training does not depend on how the serving model class
initialises (it may leave weights for the loader to fill).
"""

from __future__ import annotations

import math

import torch
from torch import nn

# softplus(x) == 1 at x = log(e - 1): the λ-MLP's fc2 bias, so λ ≈ 1 at initialisation (DESIGN §1)
SOFTPLUS_INV_ONE = math.log(math.e - 1.0)


@torch.no_grad()
def init_weights(model: nn.Module, num_layers: int, *, std: float = 0.02, dt_min: float = 1e-3,
                 dt_max: float = 0.1, dt_init_floor: float = 1e-4, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)

    def normal_(t: torch.Tensor, s: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * s)

    def uniform_(t: torch.Tensor, bound: float) -> None:
        t.copy_((torch.rand(t.shape, generator=gen) * 2 - 1) * bound)

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv1d):
            # PyTorch's default (as mamba_ssm keeps it), not FLA's normal(0.02): a depthwise conv over
            # 4 taps at std 0.02 starts the mixer as almost a no-op
            bound = 1.0 / math.sqrt(mod.weight.shape[1] * mod.weight.shape[2])
            uniform_(mod.weight, bound)
            if mod.bias is not None:
                uniform_(mod.bias, bound)
        elif isinstance(mod, nn.Linear | nn.Embedding):
            normal_(mod.weight, std)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
        elif "norm" in name.rsplit(".", 1)[-1] and getattr(mod, "weight", None) is not None:
            mod.weight.fill_(1.0)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            p.copy_(torch.log(torch.arange(1, p.numel() + 1, dtype=torch.float32)).view_as(p))
        elif leaf == "D" or leaf == "L":
            p.fill_(1.0)
        elif leaf == "dt_bias":
            dt = torch.exp(torch.rand(p.shape, generator=gen) * (math.log(dt_max) - math.log(dt_min))
                           + math.log(dt_min)).clamp(min=dt_init_floor)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))
        elif name.endswith("lambda_mlp.fc2.weight"):
            p.zero_()
        elif name.endswith("lambda_mlp.fc2.bias"):
            p.fill_(SOFTPLUS_INV_ONE)
        elif name.endswith(("out_proj.weight", "down_proj.weight")):
            # kaiming_uniform_(a=sqrt(5)) scaled by 1 / sqrt(2 * layers) (GPT-2's residual-branch scheme)
            uniform_(p, 1.0 / math.sqrt(p.shape[1]) / math.sqrt(2 * num_layers))


def no_decay(name: str, p: torch.Tensor) -> bool:
    """Parameters kept out of weight decay: vectors (norms, biases, A_log, D, dt_bias) and λ parameters."""
    leaf = name.rsplit(".", 1)[-1]
    return p.dim() < 2 or leaf in ("A_log", "D", "dt_bias", "L") or "lambda_mlp" in name
