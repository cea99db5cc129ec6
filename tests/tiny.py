"""Tiny random model directories for tests: a byte-level BPE trained on built-in text and a random model.

The weights are random but far from the identity initialisation (λ, decays, Δ, D and the norms all
vary across heads, levels and tokens), so that a wrong level, gate or state shows up in the logits.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from fenwick_llm.engine.loader import save_model
from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
from fenwick_llm.engine.model_config import ModelConfig
from fenwick_llm.engine.tokenizer import Tokenizer
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role: ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}" + EOS + "\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Fenwick trees keep prefix sums in logarithmic time.",
    "Log-linear attention keeps a state that grows with the logarithm of the sequence length.",
    "Hello, world! How are you today?",
    "A long time ago, in a galaxy far, far away, there lived a small model.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 1024 65536.",
    "Café, naïve, résumé, jalapeño; 日本語のテキスト; emoji 🙂.",
    "The state of each request is a handful of matrices, one per level of the tree.",
    "Once upon a time the model said hello, and the user said hello back.",
    "User: what is two plus two? Assistant: two plus two is four.",
    "Adaptive decay lets each level of memory fade at its own rate.",
]


def train_tokenizer(vocab_size: int = 400) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES * 4, trainer)
    return tok


def randomize_(model: LogLinearMamba2ForCausalLM) -> None:
    """Non-trivial random weights (in place, from the current torch RNG)."""
    c = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif "conv1d" in name:
                p.copy_((0.5 if leaf == "weight" else 0.1) * torch.randn_like(p))
            elif leaf == "A_log":
                p.copy_(torch.empty_like(p).uniform_(math.log(0.5), math.log(8.0)))
            elif leaf == "dt_bias":
                dt = torch.empty_like(p).uniform_(0.01, 0.3)
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif leaf == "D":
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif leaf == "L":
                p.copy_(1 + 0.5 * torch.randn_like(p))
            elif "lambda_mlp.fc2" in name:
                p.copy_(0.3 * torch.randn_like(p) + (math.log(math.expm1(1.0)) if leaf == "bias" else 0.0))
            elif "lambda_mlp.fc1" in name:
                p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1] if leaf == "weight" else 4.0))
            elif leaf == "weight" and p.dim() == 2:
                fan_in = c.hidden_size if "embeddings" in name else p.shape[1]
                p.copy_(torch.randn_like(p) / math.sqrt(fan_in))
            elif leaf == "bias":
                p.copy_(0.05 * torch.randn_like(p))


def tiny_config(lambda_mode: str = "mlp", vocab_size: int = 400, **overrides: Any) -> ModelConfig:
    d: dict[str, Any] = dict(
        model_type="log_linear_mamba2", vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2,
        head_dim=16, state_size=16, expand=2, n_groups=1, conv_kernel=4, lambda_mode=lambda_mode,
        lambda_levels=15, lambda_mlp_hidden=32, bos_token_id=None, eos_token_id=0, pad_token_id=0,
        tie_word_embeddings=False,
    )
    d.update(overrides)
    return ModelConfig.from_dict(d)


def make_tiny_model(path: str | Path, lambda_mode: str = "mlp", seed: int = 0,
                    generation_config: dict[str, Any] | None = None, **config_overrides: Any) -> Path:
    """Write a tiny random model directory at ``path`` and return it.

    ``config_overrides`` are config.json keys (hidden_size, num_hidden_layers, lambda_levels, ...);
    vocab_size defaults to the tokenizer's size.
    """
    path = Path(path)
    hf_tok = train_tokenizer()
    eos_id = hf_tok.token_to_id(EOS)
    config_overrides.setdefault("vocab_size", hf_tok.get_vocab_size())
    config_overrides.setdefault("eos_token_id", eos_id)
    config_overrides.setdefault("pad_token_id", eos_id)
    config = tiny_config(lambda_mode, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LogLinearMamba2ForCausalLM(config)
        randomize_(model)
    tokenizer = Tokenizer(hf_tok, chat_template=CHAT_TEMPLATE, eos_token=EOS)
    gen = {"eos_token_id": eos_id, "pad_token_id": eos_id} if generation_config is None else generation_config
    return save_model(model, tokenizer, path, generation_config=gen)
