"""The model's shape and options, parsed from a ``log_linear_mamba2`` config.json and validated once."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..kernels.state import max_positions

MODEL_TYPE = "log_linear_mamba2"
LAMBDA_MODES = ("linear", "mlp", "none")


class ConfigError(ValueError):
    """config.json describes a model we cannot run; the message names the key and, when known, the file."""


def gated_mlp_size(hidden_size: int, hidden_ratio: int = 4) -> int:
    """FLA GatedMLP's intermediate size: 2/3 of hidden * ratio, rounded up to a multiple of 256."""
    size = int(hidden_size * hidden_ratio * 2 / 3)
    return 256 * ((size + 255) // 256)


def _decode_float(x: Any) -> float:
    """transformers writes inf as {"__float__": "Infinity"}; plain JSON may carry "inf" / 1e999."""
    if isinstance(x, dict) and "__float__" in x:
        return float(x["__float__"])
    return float(x)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    head_dim: int = 64  # V: channels per value head
    state_size: int = 128  # K: channels of B / C per group
    expand: int = 2  # intermediate_size = expand * hidden_size
    n_groups: int = 1  # G: B / C groups shared by num_heads // n_groups value heads
    conv_kernel: int = 4
    use_bias: bool = False  # bias of in_proj / out_proj
    use_conv_bias: bool = True
    norm_eps: float = 1e-5
    D_has_hdim: bool = False  # D is [intermediate] instead of [num_heads]
    rmsnorm: bool = True  # gated RMSNorm before out_proj (else y * silu(z))
    norm_before_gate: bool = False
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    eos_token_ids: tuple[int, ...] = ()  # every end-of-sequence id (config lists); includes eos_token_id
    pad_token_id: int | None = 0
    chunk_size: int = 64
    lambda_mode: str = "linear"  # "linear" (FLA's L parameter), "mlp" (adaptive decay) or "none" (λ ≡ 1)
    lambda_mlp_hidden: int = 64
    lambda_levels: int = 15  # L: λ levels and Fenwick state levels per head
    max_model_len: int | None = None  # None: 2^(L-1)
    mlp_intermediate_size: int | None = None  # None: FLA's GatedMLP rule

    def __post_init__(self) -> None:
        fix = object.__setattr__
        if self.max_model_len is None:
            fix(self, "max_model_len", max_positions(self.lambda_levels))
        if self.mlp_intermediate_size is None:
            fix(self, "mlp_intermediate_size", gated_mlp_size(self.hidden_size))
        ids = tuple(dict.fromkeys(([self.eos_token_id] if self.eos_token_id is not None else [])
                                  + list(self.eos_token_ids)))
        fix(self, "eos_token_ids", ids)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "head_dim", "state_size", "expand",
                     "n_groups", "conv_kernel", "lambda_levels", "lambda_mlp_hidden", "chunk_size",
                     "mlp_intermediate_size", "max_model_len"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name} must be a positive integer, got {value!r}")
        need(self.conv_kernel >= 2, f"conv_kernel must be >= 2, got {self.conv_kernel}")
        need(self.intermediate_size % self.head_dim == 0,
             f"expand * hidden_size ({self.intermediate_size}) must be a multiple of head_dim "
             f"({self.head_dim})")
        need(self.num_heads % self.n_groups == 0,
             f"num_heads ({self.num_heads}) must be a multiple of n_groups ({self.n_groups})")
        need(self.lambda_mode in LAMBDA_MODES,
             f"lambda_mode must be one of {LAMBDA_MODES}, got {self.lambda_mode!r}")
        need(self.hidden_act in ("silu", "swish"),
             f"hidden_act {self.hidden_act!r} is not supported (silu only)")
        need(self.lambda_levels <= 40, f"lambda_levels={self.lambda_levels} is unreasonably large")
        limit = max_positions(self.lambda_levels)
        need(self.max_model_len <= limit,
             f"max_model_len={self.max_model_len} exceeds what {self.lambda_levels} λ levels hold ({limit}); "
             f"raise lambda_levels")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")

    # ---- derived sizes ----------------------------------------------------------------------------
    @property
    def intermediate_size(self) -> int:
        return self.expand * self.hidden_size

    @property
    def num_heads(self) -> int:
        return self.intermediate_size // self.head_dim

    @property
    def conv_dim(self) -> int:
        """Channels through conv1d: x | B | C."""
        return self.intermediate_size + 2 * self.n_groups * self.state_size

    @property
    def in_proj_size(self) -> int:
        """Columns of in_proj: z | xBC | dt | dl."""
        return self.intermediate_size + self.conv_dim + self.num_heads * (1 + self.lambda_levels)

    # ---- parsing ----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelConfig:
        """Parse FLA's ``log_linear_mamba2`` config dict (plus our lambda_* / max_model_len keys)."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type != MODEL_TYPE:
            raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                              f"(expected {MODEL_TYPE!r})")
        if d.get("residual_in_fp32", False):
            raise ConfigError(f"{source}: residual_in_fp32=True is not supported "
                              "(FLA does not support it either)")
        if d.get("attnres_block_size") is not None:
            raise ConfigError(f"{source}: attnres_block_size={d['attnres_block_size']!r} "
                              "(attention residuals) is not supported")
        if "dt_limit" in d:
            lo, hi = (_decode_float(x) for x in d["dt_limit"])
            if lo != 0.0 or not math.isinf(hi):
                raise ConfigError(f"{source}: dt_limit={[lo, hi]} is not supported (only (0, inf))")
        if d.get("hidden_ratio", 4) != 4 and d.get("mlp_intermediate_size") is None:
            raise ConfigError(f"{source}: hidden_ratio={d['hidden_ratio']} needs mlp_intermediate_size")
        eos = d.get("eos_token_id", 2)
        if isinstance(eos, list):
            d["eos_token_ids"] = tuple(int(i) for i in eos)
            d["eos_token_id"] = int(eos[0]) if eos else None
        elif "eos_token_ids" in d:
            d["eos_token_ids"] = tuple(d["eos_token_ids"])
        # Other keys (FLA's initialisation and training options, HF bookkeeping) do not change the math.
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        expected_heads = d.get("num_heads")
        try:
            config = cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if expected_heads is not None and expected_heads != config.num_heads:
            raise ConfigError(f"{source}: num_heads={expected_heads} disagrees with "
                              f"expand * hidden_size / head_dim = {config.num_heads}")
        return config

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model config not found: {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        """config.json contents: FLA's keys (so FLA loads linear-mode checkpoints) plus ours."""
        d = asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        if len(self.eos_token_ids) <= 1:
            del d["eos_token_ids"]
        d.update(model_type=MODEL_TYPE, architectures=["LogLinearMamba2ForCausalLM"],
                 num_heads=self.num_heads, residual_in_fp32=False, attnres_block_size=None)
        return d
