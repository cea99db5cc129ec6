"""Multi-query associative recall (MQAR; Zoology, Arora et al. 2023; Based, 2024): data and scoring.

A sequence of length T is `k_1 v_1 k_2 v_2 ... k_n v_n` (n distinct keys, each with a random value),
then a query region of noise tokens in which each key appears again followed by its value, at random
pair-aligned places. The model must predict the value after each query key: labels are -100 except
at the query keys, where the label is the value (the next input token).

Token ids: 0 is `<eos>` (unused by the task, kept so the engine has an end-of-sequence id), keys are
[1, 1 + n_keys), values the next n_keys ids, noise tokens the rest of the vocabulary. Keys, values and
noise are disjoint, so a noise token never looks like a key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

IGNORE = -100


@dataclass(frozen=True)
class MQARVocab:
    vocab_size: int

    def __post_init__(self) -> None:
        if self.vocab_size < 7:
            raise ValueError(f"MQAR needs a vocabulary of at least 7 tokens, got {self.vocab_size}")

    @property
    def n_keys(self) -> int:
        return (self.vocab_size - 1) // 3

    @property
    def key_start(self) -> int:
        return 1

    @property
    def value_start(self) -> int:
        return 1 + self.n_keys

    @property
    def noise_start(self) -> int:
        return 1 + 2 * self.n_keys

    def token(self, i: int) -> str:
        if i == 0:
            return "<eos>"
        if i < self.value_start:
            return f"k{i - self.key_start}"
        if i < self.noise_start:
            return f"v{i - self.value_start}"
        return f"n{i - self.noise_start}"


@dataclass(frozen=True)
class MQARBatch:
    inputs: torch.Tensor  # [N, T] int64
    labels: torch.Tensor  # [N, T] int64: the value at each query key, IGNORE elsewhere
    query_pos: torch.Tensor  # [N, Q] int64: positions of the query keys (sorted)


def generate(num_examples: int, seq_len: int, num_kv_pairs: int, vocab: MQARVocab,
             seed: int | torch.Generator, num_queries: int | None = None) -> MQARBatch:
    """MQAR examples; ``num_queries`` (default all) distinct keys are each queried once, in random order."""
    n, Q = num_kv_pairs, num_kv_pairs if num_queries is None else num_queries
    if not 1 <= Q <= n:
        raise ValueError(f"num_queries must be in [1, num_kv_pairs={n}], got {Q}")
    if n > vocab.n_keys:
        raise ValueError(f"{n} kv pairs need {n} distinct keys; vocab_size {vocab.vocab_size} has "
                         f"{vocab.n_keys}")
    region = seq_len - 2 * n
    slots = region // 2
    if slots < Q:
        raise ValueError(f"seq_len {seq_len} is too short for {n} kv pairs and {Q} queries "
                         f"(needs at least {2 * n + 2 * Q})")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    N = num_examples
    keys = torch.argsort(torch.rand(N, vocab.n_keys, generator=gen), dim=1)[:, :n] + vocab.key_start  # (N, n)
    values = torch.randint(vocab.value_start, vocab.noise_start, (N, n), generator=gen)
    x = torch.randint(vocab.noise_start, vocab.vocab_size, (N, seq_len), generator=gen)
    x[:, 0:2 * n:2] = keys
    x[:, 1:2 * n:2] = values
    which = torch.argsort(torch.rand(N, n, generator=gen), dim=1)[:, :Q]  # (N, Q): queried pair indices
    slot = torch.sort(torch.argsort(torch.rand(N, slots, generator=gen), dim=1)[:, :Q], dim=1).values
    qpos = 2 * n + 2 * slot  # (N, Q)
    qkeys, qvals = keys.gather(1, which), values.gather(1, which)
    x.scatter_(1, qpos, qkeys)
    x.scatter_(1, qpos + 1, qvals)
    labels = torch.full_like(x, IGNORE)
    labels.scatter_(1, qpos, qvals)
    return MQARBatch(x, labels, qpos)


def score(predictions: torch.Tensor, batch: MQARBatch) -> float:
    """Accuracy of predictions [N, T] (argmax next token at every position) over the query keys."""
    mask = batch.labels != IGNORE
    return float((predictions[mask] == batch.labels[mask]).float().mean())


def eval_prompts(batch: MQARBatch, seed: int) -> tuple[list[list[int]], list[int]]:
    """One prompt per example: the sequence up to and including one random query key; and its answer."""
    gen = torch.Generator().manual_seed(seed)
    N, Q = batch.query_pos.shape
    pick = torch.randint(0, Q, (N,), generator=gen)
    prompts, answers = [], []
    for i in range(N):
        p = int(batch.query_pos[i, pick[i]])
        prompts.append(batch.inputs[i, :p + 1].tolist())
        answers.append(int(batch.labels[i, p]))
    return prompts, answers


def accuracy(generated: list[list[int]], answers: list[int]) -> float:
    """Fraction of generations whose first token is the answer (an empty generation is wrong)."""
    if len(generated) != len(answers):
        raise ValueError(f"{len(generated)} generations for {len(answers)} answers")
    if not answers:
        raise ValueError("no answers to score")
    return sum(bool(g) and g[0] == a for g, a in zip(generated, answers, strict=True)) / len(answers)


def save_tokenizer(vocab: MQARVocab, out_dir: Path, model_max_length: int) -> None:
    """A WordLevel tokenizer over the synthetic vocabulary (whitespace-separated `k3 v7 n12 ...`)."""
    tok = Tokenizer(models.WordLevel({vocab.token(i): i for i in range(vocab.vocab_size)}, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<eos>"])
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "bos_token": "<eos>",
           "pad_token": "<eos>", "model_max_length": model_max_length}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
