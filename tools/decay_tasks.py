"""The three tasks of the adaptive-decay study: MQAR, selective copying and character-level language
modelling. Each gives training batches (a mixture of lengths) and scores a trained model at a sweep of
lengths: the two synthetic tasks through ``LLM.generate`` (greedy) and through the model's own forward,
language modelling through the forward (held-out nats/char and loss by position).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from fenwick_llm.tools import copy_data as cp
from fenwick_llm.tools import data
from fenwick_llm.tools import mqar_data as mq

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, T], labels [B, T]; -100 = ignore)
Sampler = Callable[[int, torch.Generator], Batch]


@dataclass(frozen=True)
class MQARSpec:
    vocab_size: int = 512
    # (length, kv pairs): pairs = length / 32, the short settings teach the mechanism (docs/mqar.md)
    train_mix: tuple[tuple[int, int], ...] = ((64, 2), (128, 4), (256, 8), (512, 16), (1024, 32), (2048, 64))
    eval_lens: tuple[int, ...] = (2048, 4096, 8192, 16384)
    eval_pairs: int = 64  # kv pairs at evaluation: the most in the mixture
    examples: int = 128  # prompts per length (fewer if the evaluation budget runs short)
    name: str = "mqar"


@dataclass(frozen=True)
class CopySpec:
    vocab_size: int = 19  # 16 data tokens
    num_tokens: int = 16  # M: data tokens to copy at evaluation
    # (length, data tokens): fewer tokens in the short settings, as MQAR's mixture has fewer pairs
    train_mix: tuple[tuple[int, int], ...] = ((64, 2), (128, 4), (256, 8), (512, 16), (1024, 16), (2048, 16))
    eval_lens: tuple[int, ...] = (2048, 4096, 8192, 16384)
    examples: int = 64
    name: str = "copy"


@dataclass(frozen=True)
class LMSpec:
    text: str  # path of the training text, read at run time
    seq_len: int = 2048  # training windows
    eval_lens: tuple[int, ...] = (2048, 4096, 8192, 16384)  # held-out windows, each from an empty state
    val_fraction: float = 0.1
    name: str = "lm"


TaskSpec = MQARSpec | CopySpec | LMSpec
MIN_EXAMPLES = 8


def eval_seed(seed: int, T: int) -> int:
    """Evaluation data: the same for every variant at one seed, disjoint from the training stream's seed."""
    return 2_000_000 + seed * 65536 + T


# ---- helpers shared by the tasks -------------------------------------------------------------------
@torch.no_grad()
def forward_logits(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device,
                   fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], max_tokens: int = 65536
                   ) -> torch.Tensor:
    """fn(logits [b, T, vocab], rows [b]) for groups of rows of inputs [N, T], concatenated (on the CPU)."""
    T = inputs.shape[1]
    step = max(1, max_tokens // T)
    outs = []
    for a in range(0, inputs.shape[0], step):
        rows = torch.arange(a, min(a + step, inputs.shape[0]))
        outs.append(fn(model(inputs[rows].to(device)).float(), rows).cpu())
    return torch.cat(outs)


def argmax_forward(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device) -> torch.Tensor:
    return forward_logits(model, inputs, device, lambda logits, _: logits.argmax(-1))


def load_llm(model_dir: Path | None, device: torch.device, max_len: int) -> Any:
    """The serving engine over a model directory (None: the variant is not servable), eager: the answers
    come from prefill and a few decode steps, nothing worth capturing in CUDA graphs."""
    if model_dir is None:
        return None
    from fenwick_llm.engine import LLM

    return LLM(str(model_dir), device=device.type, max_num_seqs=64,
               max_num_batched_tokens=max(2 * max_len, 4096), long_prefill_chunk=max_len, enforce_eager=True)


def generate(llm: Any, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy completions of token-id prompts through ``LLM.generate`` (exactly max_tokens each)."""
    from fenwick_llm.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]


class EvalClock:
    """How many examples the rest of an evaluation budget affords, from the token rate seen so far."""

    def __init__(self, budget: float) -> None:
        self.t0, self.budget, self.rate = time.perf_counter(), budget, 0.0

    def affordable(self, wanted: int, tokens_per_example: int) -> int:
        if self.rate <= 0:
            return wanted
        left = self.budget - (time.perf_counter() - self.t0)
        return min(wanted, int(left * self.rate / tokens_per_example))

    def record(self, tokens: int, seconds: float) -> None:
        self.rate = tokens / max(seconds, 1e-3)


# ---- MQAR ------------------------------------------------------------------------------------------
def mqar_sampler(spec: MQARSpec, batch_tokens: int, device: torch.device) -> Sampler:
    vocab, step = mq.MQARVocab(spec.vocab_size), [0]

    def next_batch(_: int, gen: torch.Generator) -> Batch:
        T, n = spec.train_mix[step[0] % len(spec.train_mix)]
        step[0] += 1
        b = mq.generate(max(batch_tokens // T, 1), T, n, vocab, gen)
        return b.inputs.to(device, non_blocking=True), b.labels.to(device, non_blocking=True)

    return next_batch


def mqar_eval(spec: MQARSpec, model: torch.nn.Module, device: torch.device, model_dir: Path | None,
              seed: int, budget: float, forward_ctx: Callable) -> dict:
    """Per length: engine_acc (LLM.generate, one query per prompt; servable models only), forward_acc (the
    same queries from a full-sequence forward) and forward_acc_all (every query of every example)."""
    vocab, clock, rows = mq.MQARVocab(spec.vocab_size), EvalClock(budget), {}
    llm = load_llm(model_dir, device, max(spec.eval_lens))
    for T in spec.eval_lens:
        n = clock.affordable(spec.examples, T // 2 + spec.eval_pairs)
        if n < MIN_EXAMPLES:
            rows[str(T)] = {"skipped": "evaluation budget spent"}
            continue
        t = time.perf_counter()
        batch = mq.generate(n, T, spec.eval_pairs, vocab, seed=eval_seed(seed, T))
        prompts, answers = mq.eval_prompts(batch, seed=eval_seed(seed, T))
        with forward_ctx():
            pred = argmax_forward(model, batch.inputs, device)  # (n, T)
        last = torch.tensor([len(p) - 1 for p in prompts])
        row = {"examples": n,
               "forward_acc": float((pred[torch.arange(n), last] == torch.tensor(answers)).float().mean()),
               "forward_acc_all": mq.score(pred, batch)}
        if llm is not None:
            row["engine_acc"] = mq.accuracy(generate(llm, prompts, 1), answers)
        row["seconds"] = round(time.perf_counter() - t, 2)
        clock.record(sum(len(p) for p in prompts), time.perf_counter() - t)
        rows[str(T)] = row
    return rows


# ---- selective copying -----------------------------------------------------------------------------
def copy_sampler(spec: CopySpec, batch_tokens: int, device: torch.device) -> Sampler:
    vocab, step = cp.CopyVocab(spec.vocab_size), [0]

    def next_batch(_: int, gen: torch.Generator) -> Batch:
        T, M = spec.train_mix[step[0] % len(spec.train_mix)]
        step[0] += 1
        b = cp.generate(max(batch_tokens // T, 1), T, M, vocab, gen)
        return b.inputs.to(device, non_blocking=True), b.labels.to(device, non_blocking=True)

    return next_batch


def copy_eval(spec: CopySpec, model: torch.nn.Module, device: torch.device, model_dir: Path | None,
              seed: int, budget: float, forward_ctx: Callable) -> dict:
    """Per length: engine_token_acc / engine_exact (greedy generation of the M tokens after the separator;
    servable models only) and forward_token_acc / forward_exact (teacher-forced forward)."""
    vocab, clock, rows = cp.CopyVocab(spec.vocab_size), EvalClock(budget), {}
    llm = load_llm(model_dir, device, max(spec.eval_lens))
    for T in spec.eval_lens:
        n = clock.affordable(spec.examples, T)
        if n < MIN_EXAMPLES:
            rows[str(T)] = {"skipped": "evaluation budget spent"}
            continue
        t = time.perf_counter()
        batch = cp.generate(n, T, spec.num_tokens, vocab, seed=eval_seed(seed, T))
        with forward_ctx():
            fwd = cp.forward_score(argmax_forward(model, batch.inputs, device), batch)
        row = {"examples": n, **{f"forward_{k}": v for k, v in fwd.items()}}
        if llm is not None:
            gen = generate(llm, cp.prompts(batch), spec.num_tokens)
            row.update({f"engine_{k}": v for k, v in cp.score(gen, batch.answers).items()})
        row["seconds"] = round(time.perf_counter() - t, 2)
        clock.record(n * T, time.perf_counter() - t)
        rows[str(T)] = row
    return rows


# ---- character-level language modelling ---------------------------------------------------------------
@dataclass(frozen=True)
class CharText:
    chars: str  # the vocabulary: id i + 1 is chars[i]; id 0 is <eos> (unused)
    train: torch.Tensor  # [N] int64
    val: torch.Tensor  # [M] int64: the held-out tail

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1


@functools.lru_cache(maxsize=2)
def load_text(path: str, val_fraction: float) -> CharText:
    text = Path(path).read_text(encoding="utf-8")
    chars = "".join(sorted(set(text)))
    index = {c: i + 1 for i, c in enumerate(chars)}
    train, val = data.split_text(text, val_fraction)
    enc = lambda s: torch.tensor([index[c] for c in s], dtype=torch.int64)  # noqa: E731
    return CharText(chars, enc(train), enc(val))


def lm_sampler(spec: LMSpec, batch_tokens: int, device: torch.device) -> Sampler:
    text = load_text(spec.text, spec.val_fraction)
    sampler = data.WindowSampler([text.train.to(device)], [1.0], spec.seq_len)
    return lambda _, gen: sampler(max(batch_tokens // spec.seq_len, 1), gen)


def position_edges(T: int, first: int = 64) -> list[int]:
    """Bin edges 0, first, 2·first, 4·first, ..., T: loss by position on a log scale."""
    edges = [0]
    e = min(first, T)
    while e < T:
        edges.append(e)
        e *= 2
    return edges + [T]


def _token_loss(labels: torch.Tensor, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [b, T] of logits [b, T, vocab] against labels[rows]."""
    return F.cross_entropy(logits.transpose(1, 2), labels[rows].to(logits.device), reduction="none")


def lm_eval(spec: LMSpec, model: torch.nn.Module, device: torch.device, model_dir: Path | None,
            seed: int, budget: float, forward_ctx: Callable) -> dict:
    """Per window length: held-out nats/char over non-overlapping windows (each from an empty state; the
    tail that fills no window is left out); at the longest, mean loss in position bins."""
    val, rows = load_text(spec.text, spec.val_fraction).val, {}
    for T in spec.eval_lens:
        n = (val.numel() - 1) // T
        if n < 1:
            rows[str(T)] = {"skipped": f"held-out text shorter than {T + 1} characters"}
            continue
        t = time.perf_counter()
        x, y = val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)
        with forward_ctx():
            loss = forward_logits(model, x, device, functools.partial(_token_loss, y))  # (n, T)
        row = {"windows": n, "nats_per_char": float(loss.double().mean())}
        if T == max(spec.eval_lens):
            edges = position_edges(T)
            per_pos = loss.double().mean(0)
            row["position_edges"] = edges
            bins = zip(edges[:-1], edges[1:], strict=True)
            row["position_loss"] = [float(per_pos[a:b].mean()) for a, b in bins]
        row["seconds"] = round(time.perf_counter() - t, 2)
        rows[str(T)] = row
    return rows


def vocab_size(spec: TaskSpec) -> int:
    if isinstance(spec, LMSpec):
        return load_text(spec.text, spec.val_fraction).vocab_size
    return spec.vocab_size


def train_lengths(spec: TaskSpec) -> list[int]:
    if isinstance(spec, MQARSpec):
        return [T for T, _ in spec.train_mix]
    if isinstance(spec, CopySpec):
        return [T for T, _ in spec.train_mix]
    return [spec.seq_len]


def sampler(spec: TaskSpec, batch_tokens: int, device: torch.device) -> Sampler:
    make = {"mqar": mqar_sampler, "copy": copy_sampler, "lm": lm_sampler}[spec.name]
    return make(spec, batch_tokens, device)


def evaluate(spec: TaskSpec, *args, **kwargs) -> dict:
    return {"mqar": mqar_eval, "copy": copy_eval, "lm": lm_eval}[spec.name](spec, *args, **kwargs)


def save_tokenizer(spec: TaskSpec, out_dir: Path, max_len: int) -> None:
    """A WordLevel tokenizer over the synthetic vocabulary, so that LLM loads the model directory."""
    vocab = mq.MQARVocab(spec.vocab_size) if isinstance(spec, MQARSpec) else cp.CopyVocab(spec.vocab_size)
    mq.save_tokenizer(vocab, out_dir, max_len)
