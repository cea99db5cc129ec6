"""The training loop shared by the text recipe and MQAR: AdamW, warmup + cosine, bf16 autocast on GPU,
optional dropout on the residual branches (forward hooks, nothing saved), periodic held-out evaluation
keeping the best weights, and a wall-clock budget that compresses the schedule instead of cutting it."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from fenwick_llm.tools.init import no_decay
from torch import nn
from tqdm import tqdm

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs [B, T], labels [B, T] with -100 = ignore)


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # optimizer steps (the schedule's length)
    batch_size: int
    lr: float
    min_lr_ratio: float = 0.1  # cosine floor, as a fraction of lr
    warmup: int = 100  # linear warmup steps
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.0  # on the outputs of each layer's mixer and MLP, and on the embeddings
    amp: bool = True  # bf16 autocast where the device is CUDA
    eval_every: int = 250  # steps between held-out evaluations (and at the end)
    time_budget: float = 0.0  # seconds; > 0 compresses the schedule so that it ends within the budget
    seed: int = 0
    progress_interval: float = 0.0  # seconds between progress-bar refreshes; 0 = 1 s on a tty, else 10 s


@dataclass
class TrainResult:
    steps_run: int
    seconds: float
    train_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since last log)
    evals: list[tuple[int, dict]] = field(default_factory=list)  # (step, metrics)
    best_step: int = -1
    best_metric: float = math.inf
    stopped_by_budget: bool = False


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def add_dropout_hooks(model: nn.Module, p: float) -> list:
    """Dropout on residual-branch outputs (`*.mixer`, `*.mlp`) and on the embedding output."""
    if p <= 0:
        return []

    def hook(mod: nn.Module, args, out):
        return F.dropout(out, p, training=mod.training) if isinstance(out, torch.Tensor) else out

    handles = []
    for name, mod in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("mixer", "mlp") or isinstance(mod, nn.Embedding):
            handles.append(mod.register_forward_hook(hook))
    if not handles:
        raise RuntimeError("dropout asked for, but the model has no `mixer` / `mlp` / embedding modules")
    return handles


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, keep = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (keep if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup over cfg.warmup steps, then cosine from lr to lr * min_lr_ratio as progress goes 0 → 1"""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    cos = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


def train(model: nn.Module, next_batch: Callable[[int, torch.Generator], Batch], cfg: TrainConfig,
          device: torch.device, evaluate: Callable[[nn.Module], dict] | None = None,
          metric: str = "loss", desc: str = "train") -> TrainResult:
    """Train ``model`` in place; on return it holds the weights of the best evaluation (if any).

    ``next_batch(batch_size, generator)`` gives (inputs, labels) on ``device``; ``evaluate(model)``
    returns a dict of held-out metrics, ``metric`` the key to minimise.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = make_optimizer(model, cfg, device)
    hooks = add_dropout_hooks(model, cfg.dropout)
    res = TrainResult(steps_run=0, seconds=0.0)
    best_state: dict[str, torch.Tensor] | None = None
    interval = cfg.progress_interval or (1.0 if sys.stderr.isatty() else 10.0)
    bar = tqdm(total=cfg.steps, desc=desc, mininterval=interval, maxinterval=max(interval, 10.0),
               ascii=not sys.stderr.isatty(), dynamic_ncols=sys.stderr.isatty())
    t0 = time.perf_counter()
    run_loss, run_n = 0.0, 0

    def do_eval(step: int) -> None:
        nonlocal best_state
        if evaluate is None:
            return
        model.eval()
        with torch.no_grad(), autocast(device, cfg.amp):
            m = evaluate(model)
        model.train()
        res.evals.append((step, m))
        msg = ", ".join(f"{k} {v:.4f}" for k, v in m.items())
        tqdm.write(f"[{desc}] step {step}: {msg}", file=sys.stdout)
        if m[metric] < res.best_metric:
            res.best_metric, res.best_step = m[metric], step
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    model.train()
    step = 0
    try:
        while True:
            elapsed = time.perf_counter() - t0
            progress = step / cfg.steps
            if cfg.time_budget > 0:
                progress = max(progress, elapsed / cfg.time_budget)
            if progress >= 1.0:
                res.stopped_by_budget = step < cfg.steps
                break
            lr = lr_at(progress, step, cfg)
            for grp in opt.param_groups:
                grp["lr"] = lr
            x, y = next_batch(cfg.batch_size, gen)
            with autocast(device, cfg.amp):
                logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            run_loss = run_loss + loss.detach()  # stays on the device: no sync per step
            run_n += 1
            if step % 10 == 0 or step == 1:
                mean = float(run_loss) / run_n
                if not math.isfinite(mean):
                    raise FloatingPointError(f"[{desc}] training loss is {mean} at step {step}")
                res.train_losses.append((step, mean))
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}", refresh=False)
                run_loss, run_n = 0.0, 0
            bar.update(1)
            if cfg.eval_every > 0 and step % cfg.eval_every == 0:
                do_eval(step)
        if run_n:
            res.train_losses.append((step, float(run_loss) / run_n))
        if not res.evals or res.evals[-1][0] != step:
            do_eval(step)
    finally:
        bar.close()
        for h in hooks:
            h.remove()
    res.steps_run = step
    res.seconds = time.perf_counter() - t0
    if best_state is not None:
        model.load_state_dict(best_state)
    return res
