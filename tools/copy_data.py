"""Selective copying (Gu & Dao, Mamba, 2023): data and scoring.

A sequence of length T is a context of T - 1 - M tokens, mostly noise with M data tokens at random
places, then a separator, then the M data tokens again in their order. The model must produce them
after the separator: labels are -100 except at the separator and the first M - 1 answer tokens, whose
label is the next answer token. Nothing but selection tells data from noise, and the data can sit
anywhere in the context, so recall has to survive the whole distance.

Token ids: 0 is `<eos>` (unused by the task), 1 the noise token, 2 the separator, data tokens the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE = -100
NOISE, SEP = 1, 2


@dataclass(frozen=True)
class CopyVocab:
    vocab_size: int

    def __post_init__(self) -> None:
        if self.vocab_size < 4:
            raise ValueError(f"selective copying needs at least 4 vocabulary ids, got {self.vocab_size}")

    @property
    def data_start(self) -> int:
        return 3

    @property
    def n_data(self) -> int:
        return self.vocab_size - self.data_start

    def token(self, i: int) -> str:
        if i == 0:
            return "<eos>"
        if i == NOISE:
            return "_"
        if i == SEP:
            return "|"
        return f"d{i - self.data_start}"


@dataclass(frozen=True)
class CopyBatch:
    inputs: torch.Tensor  # [N, T] int64
    labels: torch.Tensor  # [N, T] int64: the next answer token at the separator and answers, IGNORE elsewhere
    answers: torch.Tensor  # [N, M] int64: the data tokens in order
    data_pos: torch.Tensor  # [N, M] int64: where they sit in the context (sorted)

    @property
    def prompt_len(self) -> int:
        """Context and separator: what a prompt holds."""
        return self.inputs.shape[1] - self.answers.shape[1]


def generate(num_examples: int, seq_len: int, num_tokens: int, vocab: CopyVocab,
             seed: int | torch.Generator) -> CopyBatch:
    """Selective-copying examples of total length ``seq_len`` with ``num_tokens`` data tokens each."""
    N, M = num_examples, num_tokens
    ctx = seq_len - 1 - M
    if M < 1 or ctx < M:
        raise ValueError(f"seq_len {seq_len} is too short for {M} data tokens (needs at least {2 * M + 1})")
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    answers = torch.randint(vocab.data_start, vocab.vocab_size, (N, M), generator=gen)
    pos = torch.sort(torch.argsort(torch.rand(N, ctx, generator=gen), dim=1)[:, :M], dim=1).values
    x = torch.full((N, seq_len), NOISE, dtype=torch.int64)
    x.scatter_(1, pos, answers)
    x[:, ctx] = SEP
    x[:, ctx + 1:] = answers
    labels = torch.full_like(x, IGNORE)
    labels[:, ctx:seq_len - 1] = answers
    return CopyBatch(x, labels, answers, pos)


def prompts(batch: CopyBatch) -> list[list[int]]:
    """One prompt per example: the context and the separator."""
    return batch.inputs[:, :batch.prompt_len].tolist()


def score(generated: list[list[int]], answers: torch.Tensor) -> dict[str, float]:
    """token_acc: fraction of answer tokens produced at their place; exact: fraction of sequences all right.

    generated: one list of token ids per example (a short one counts its missing tokens wrong).
    """
    N, M = answers.shape
    if len(generated) != N:
        raise ValueError(f"{len(generated)} generations for {N} examples")
    got = torch.full((N, M), -1, dtype=torch.int64)
    for i, g in enumerate(generated):
        g = list(g)[:M]
        got[i, :len(g)] = torch.tensor(g, dtype=torch.int64)
    hit = got == answers
    return {"token_acc": float(hit.float().mean()), "exact": float(hit.all(1).float().mean())}


def forward_score(predictions: torch.Tensor, batch: CopyBatch) -> dict[str, float]:
    """The same metrics from a full-sequence forward (argmax next token, answers fed back: teacher forcing).

    predictions: [N, T] argmax at every position. Exact match here equals greedy generation's exact
    match; token accuracy can differ, since generation feeds back its own mistakes.
    """
    P, M = batch.prompt_len, batch.answers.shape[1]
    pred = predictions[:, P - 1:P - 1 + M]  # (N, M): the separator and the first M - 1 answers
    hit = pred == batch.answers
    return {"token_acc": float(hit.float().mean()), "exact": float(hit.all(1).float().mean())}
