"""Write a random-weight model directory of a given size, for serving benchmarks (no training, offline).

The weights follow FLA's initialisation in spirit (normal 0.02 matrices, unit norms and D, A = 1..H,
Δ log-uniform in [1e-3, 0.1], λ ≈ 1), so activations stay finite at any depth. The tokenizer is a
synthetic byte-level BPE of exactly ``--vocab`` tokens built from printable ASCII, so that every id the
model samples decodes to text at once (a random model samples all ids), or with ``--tokenizer word`` a
word-level one whose text of any ids encodes back to those ids: a random model's replies then re-tokenize
to the tokens it generated, as a trained model's mostly do (a BPE re-tokenizes random ids differently),
which multi-turn chat benchmarks of the prefix cache need. Both have the demo model's chat template.

    python -m fenwick_llm.tools.make_random_model --hidden 768 --layers 24 --out /tmp/fenwick-250m  # 259 M
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from fenwick_llm.engine.loader import save_model
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.engine.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

EOS = "<|endoftext|>"
SPECIAL = [EOS, "<|system|>", "<|user|>", "<|assistant|>", "<unk>"]
CHAT_TEMPLATE = (  # the demo model's
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|endoftext|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def ascii_bpe(vocab_size: int) -> HFTokenizer:
    """A byte-level BPE whose tokens are strings of printable ASCII (space as 'Ġ', newline as 'Ċ')."""
    base = [chr(b) for b in range(33, 127)] + ["\u0120", "\u010a"]
    vocab = {EOS: 0, **{s: i + 1 for i, s in enumerate(base)}}
    merges: list[tuple[str, str]] = []
    frontier = list(base)
    while len(vocab) < vocab_size:
        grown = []
        for left in frontier:
            for right in base:
                if len(vocab) >= vocab_size:
                    break
                if left + right not in vocab:
                    vocab[left + right] = len(vocab)
                    merges.append((left, right))
                    grown.append(left + right)
        frontier = grown
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return tok


def word_level(vocab_size: int) -> HFTokenizer:
    """Lowercase words split at whitespace and joined by spaces (``decode`` without a decoder), exactly
    ``vocab_size`` tokens with EOS at 0 and the chat roles as special tokens."""
    def word(i: int) -> str:
        s = ""
        while True:
            s, i = chr(97 + i % 26) + s, i // 26 - 1
            if i < 0:
                return s

    vocab = {s: i for i, s in enumerate(SPECIAL)}
    vocab.update((word(i), len(SPECIAL) + i) for i in range(vocab_size - len(SPECIAL)))
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    return tok


@torch.no_grad()
def randomize_(model: LogLinearMamba2ForCausalLM, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            a = torch.arange(1, p.numel() + 1, dtype=torch.float32)
            p.copy_(torch.log(a).view_as(p))
        elif leaf == "dt_bias":
            u = torch.rand(p.shape, generator=gen)
            dt = torch.exp(u * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1
        elif leaf in ("D", "L") or "norm" in name:
            p.fill_(1.0)
        elif "lambda_mlp.fc2" in name:
            p.fill_(math.log(math.e - 1.0) if leaf == "bias" else 0.0)  # λ = softplus(bias) = 1
        elif leaf == "bias":
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--head-dim", type=int, default=64, help="V")
    ap.add_argument("--state-size", type=int, default=128, help="K")
    ap.add_argument("--expand", type=int, default=2)
    ap.add_argument("--n-groups", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--lambda-mode", choices=["mlp", "linear", "none"], default="mlp")
    ap.add_argument("--lambda-levels", type=int, default=15)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="of the saved weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", choices=["bpe", "word"], default="bpe",
                    help="byte-level BPE, or word-level (replies re-tokenize exactly: multi-turn benchmarks)")
    a = ap.parse_args()

    config = ModelConfig.from_dict({
        "model_type": "log_linear_mamba2", "vocab_size": a.vocab, "hidden_size": a.hidden,
        "num_hidden_layers": a.layers, "head_dim": a.head_dim, "state_size": a.state_size,
        "expand": a.expand, "n_groups": a.n_groups, "lambda_mode": a.lambda_mode,
        "lambda_levels": a.lambda_levels, "bos_token_id": None, "eos_token_id": 0, "pad_token_id": 0,
        "tie_word_embeddings": False,
    })
    model = LogLinearMamba2ForCausalLM(config, device="cpu", dtype=DTYPES[a.dtype])
    randomize_(model, a.seed)
    hf = ascii_bpe(a.vocab) if a.tokenizer == "bpe" else word_level(a.vocab)
    tokenizer = Tokenizer(hf, eos_token=EOS, chat_template=CHAT_TEMPLATE)
    save_model(model, tokenizer, a.out, generation_config={"eos_token_id": 0, "pad_token_id": 0})
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {a.out}: {n / 1e6:.1f} M parameters ({a.dtype}), vocab {a.vocab}, H = {config.num_heads}, "
          f"K = {a.state_size}, V = {a.head_dim}, max_model_len {config.max_model_len}")


if __name__ == "__main__":
    main()
