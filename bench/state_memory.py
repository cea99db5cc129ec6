"""Per-request state memory of a log-linear Mamba-2 model against a same-size Transformer's KV cache.

Pure arithmetic on the model's shapes (no weights are loaded):

    Fenwick levels per request = L(T) x layers x H x K x V x bytes,   L(T) = bitlen(T - 1) + 1
    live (non-zero) levels after T tokens = popcount(T - 1) + 1      (DESIGN.md §1)
    Transformer KV per request  = 2 x layers x T x hidden x 2 bytes   (bf16 K and V, full attention)

    python bench/state_memory.py                       # the ~250M serving-benchmark config
    python bench/state_memory.py --config models/fenwick-shakespeare/config.json
    python bench/state_memory.py --json out.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

H200_BYTES = 141 * 10**9  # H200 HBM3e, as NVIDIA states it (141 GB)
CONTEXTS = (1024, 4096, 16384, 32768, 131072)


@dataclass(frozen=True)
class Shapes:
    hidden: int  # d_model
    layers: int
    head_dim: int  # V: value width per head
    state_size: int  # K: key width (Mamba-2 d_state)
    expand: int
    n_groups: int
    conv_kernel: int
    vocab: int
    mlp_intermediate: int
    lambda_levels: int  # λ levels of the mixer's dl projection (15 in FLA)

    @property
    def heads(self) -> int:  # H value heads
        return self.expand * self.hidden // self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.expand * self.hidden + 2 * self.n_groups * self.state_size

    def num_params(self) -> int:
        """Parameters of FLA's LogLinearMamba2ForCausalLM (linear λ, untied embeddings)."""
        d, i, h = self.hidden, self.expand * self.hidden, self.heads
        in_proj = d * (i + self.conv_dim + h + h * self.lambda_levels)
        mixer = in_proj + self.conv_dim * (self.conv_kernel + 1) + 3 * h + h * self.lambda_levels
        mixer += i + i * d  # gated norm, out_proj
        mlp = 3 * d * self.mlp_intermediate
        per_layer = 2 * d + mixer + mlp
        return self.layers * per_layer + 2 * self.vocab * d + d


def levels_for(t: int) -> int:
    """L(T): levels a pool slot needs to hold positions 0..T-1."""
    return max(t - 1, 0).bit_length() + 1


def live_levels(t: int) -> int:
    """Non-zero levels after absorbing T tokens (the last position is T - 1)."""
    return bin(max(t - 1, 0)).count("1") + 1


def mean_live_levels(t: int) -> float:
    """Mean of popcount(p)+1 over the positions p < T a request passes through."""
    return sum(bin(p).count("1") for p in range(t)) / t + 1


def shapes_from_config(path: Path) -> Shapes:
    c = json.loads(path.read_text())
    hidden = c["hidden_size"]
    inter = c.get("mlp_intermediate_size") or c.get("intermediate_size")
    inter = inter or _fla_mlp_width(hidden, c.get("hidden_ratio", 4))
    return Shapes(
        hidden=hidden,
        layers=c["num_hidden_layers"],
        head_dim=c.get("head_dim", 64),
        state_size=c.get("state_size", 128),
        expand=c.get("expand", 2),
        n_groups=c.get("n_groups", 1),
        conv_kernel=c.get("conv_kernel", 4),
        vocab=c["vocab_size"],
        mlp_intermediate=inter,
        lambda_levels=c.get("lambda_levels", 15),
    )


def _fla_mlp_width(hidden: int, ratio: int) -> int:
    width = int(hidden * ratio * 2 / 3)
    return 256 * ((width + 255) // 256)


@dataclass
class Row:
    context: int
    levels: int  # L(T), what a slot allocates
    live_levels: int  # popcount(T-1)+1, non-zero after T tokens
    mean_live_levels: float  # popcount+1 averaged over positions 0..T-1
    state_bytes: int  # L(T) levels: what the state pool holds per request
    paged_state_bytes: int  # mean live levels only: what a paged block pool would hold on average
    conv_bytes: int  # conv state, in the state dtype
    kv_bytes: int  # same-size Transformer, bf16
    fit_h200: int  # requests whose allocated state fits beside the bf16 weights
    fit_h200_kv: int


def conv_elems(s: Shapes) -> int:
    return s.layers * s.conv_dim * (s.conv_kernel - 1)


def table(s: Shapes, contexts: tuple[int, ...], state_bytes_per_elem: int = 4) -> list[Row]:
    per_level = s.layers * s.heads * s.state_size * s.head_dim * state_bytes_per_elem
    conv = conv_elems(s) * state_bytes_per_elem
    free = H200_BYTES - 2 * s.num_params()
    rows = []
    for t in contexts:
        state, mean_live = levels_for(t) * per_level, mean_live_levels(t)
        kv = 2 * s.layers * t * s.hidden * 2
        rows.append(
            Row(
                context=t,
                levels=levels_for(t),
                live_levels=live_levels(t),
                mean_live_levels=mean_live,
                state_bytes=state,
                paged_state_bytes=round(mean_live * per_level),
                conv_bytes=conv,
                kv_bytes=kv,
                fit_h200=free // (state + conv),
                fit_h200_kv=free // kv,
            )
        )
    return rows


def markdown(s: Shapes, rows: list[Row], state_dtype: str = "float32") -> str:
    gb = 1e9
    head = (
        f"Model: hidden {s.hidden}, {s.layers} layers, H = {s.heads} heads, K = {s.state_size}, "
        f"V = {s.head_dim}, vocab {s.vocab}: {s.num_params() / 1e6:.1f} M parameters, "
        f"{2 * s.num_params() / gb:.2f} GB in bf16. One level of one request: "
        f"{s.layers} x {s.heads} x {s.state_size} x {s.head_dim} x {rows[0].conv_bytes // conv_elems(s)} B = "
        f"{rows[0].state_bytes / rows[0].levels / 1e6:.3f} MB; conv state "
        f"{rows[0].conv_bytes / 1e6:.2f} MB per request.\n\n"
        f"| T | L(T) | Fenwick state / request ({state_dtype}) | live levels at T | mean live levels "
        "| mean live state | Transformer KV / request (bf16) | KV / state "
        "| requests per H200: Fenwick | requests per H200: Transformer |\n"
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )
    lines = [
        f"| {r.context:,} | {r.levels} | {r.state_bytes / gb:.3f} GB | {r.live_levels} "
        f"| {r.mean_live_levels:.1f} | {r.paged_state_bytes / gb:.3f} GB | {r.kv_bytes / gb:.3f} GB "
        f"| {r.kv_bytes / r.state_bytes:.1f}x | {r.fit_h200:,} | {r.fit_h200_kv:,} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="a model's config.json (default: the ~250M benchmark shapes)")
    p.add_argument("--contexts", type=int, nargs="+", default=list(CONTEXTS))
    p.add_argument("--state-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    a = p.parse_args()
    s = (
        shapes_from_config(a.config)
        if a.config
        else Shapes(
            hidden=768,
            layers=24,
            head_dim=64,
            state_size=128,
            expand=2,
            n_groups=1,
            conv_kernel=4,
            vocab=32000,
            mlp_intermediate=2048,
            lambda_levels=15,
        )
    )
    rows = table(s, tuple(a.contexts), 4 if a.state_dtype == "float32" else 2)
    print(markdown(s, rows, a.state_dtype))
    if a.json:
        a.json.write_text(
            json.dumps(
                {"shapes": asdict(s), "params": s.num_params(), "rows": [asdict(r) for r in rows]}, indent=2
            )
        )


if __name__ == "__main__":
    main()
