"""One run of the adaptive-decay study: build a variant, train it on a task with the chunked training
attention, score it at the length sweep, and return a JSON-ready dict. Runs in a worker process of
tools/decay_study.py (or in-process for calibration and tests).
"""

from __future__ import annotations

import contextlib
import gc
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fenwick_llm.tools import decay_tasks as tasks
from fenwick_llm.tools.decay_models import VARIANTS, Shape, build
from fenwick_llm.tools.modeldir import count_parameters, save_weights
from fenwick_llm.tools.train_attn import training_attention
from fenwick_llm.tools.trainer import TrainConfig, autocast, train

from fenwick_llm import kernels

ATTENTION = "chunked"  # tools/chunk_attn.py: O(T·C) memory, so training reaches 2k-8k tokens


@dataclass(frozen=True)
class TrainPlan:
    """What every variant and seed of one task gets: the same steps and tokens per step."""

    steps: int
    batch_tokens: int  # per step; a length-T batch has batch_tokens // T sequences
    lr: float
    warmup: int = 50
    weight_decay: float = 0.1
    time_cap: float = 0.0  # seconds; past it the trainer compresses the schedule (recorded per run)
    eval_budget: float = 60.0  # seconds for the length sweep (fewer examples past it, at least 8)


@dataclass(frozen=True)
class Job:
    task: tasks.TaskSpec
    variant: str  # a key of decay_models.VARIANTS
    seed: int
    shape: Shape
    plan: TrainPlan
    device: str
    work_dir: str  # model directories for the engine go here
    deadline: float = 0.0  # time.time() by which the job must end; 0: none
    expected_seconds: float = 0.0  # the driver's estimate: a job that cannot end by the deadline is skipped
    threads: int = 1  # torch intra-op threads


def job_name(job: Job) -> str:
    return f"{job.task.name}-{job.variant}-s{job.seed}"


@contextlib.contextmanager
def forward_context(device: torch.device) -> Iterator[None]:
    """Full-sequence forwards as in training: the chunked attention, bf16 autocast on CUDA."""
    with training_attention(ATTENTION), autocast(device, True):
        yield


def level_scale_profile(model: torch.nn.Module, inputs: torch.Tensor, device: torch.device
                        ) -> list[list[float]]:
    """Mean λ per layer and level over [B, T] inputs, averaged over the heads and over the positions whose
    level is non-empty (level l >= 1 of t holds tokens iff bit l - 1 of t is set): [layers][L], None for
    levels that no position of the inputs reaches."""
    seen: list[torch.Tensor] = []
    with forward_context(device):
        inner = kernels.chunk_log_linear_attn

        def record(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                   level_scales: torch.Tensor, **kw: Any) -> tuple[torch.Tensor, Any]:
            lam = level_scales.float()  # (B, T, H, L)
            t = torch.arange(lam.shape[1], device=lam.device)[:, None]
            lvl = torch.arange(lam.shape[-1], device=lam.device)[None]
            used = ((lvl == 0) | ((t >> (lvl - 1).clamp(min=0)) & 1).bool()).float()  # (T, L)
            mean = (lam.mean((0, 2)) * used).sum(0) / used.sum(0).clamp(min=1)
            seen.append(mean.masked_fill(used.sum(0) == 0, float("nan")))
            return inner(q, k, v, g, level_scales, **kw)

        kernels.chunk_log_linear_attn = record
        try:
            with torch.no_grad():
                model(inputs.to(device))
        finally:
            kernels.chunk_log_linear_attn = inner
    return [[round(float(x), 4) if x == x else None for x in s] for s in seen]  # None: a level never used


def profile_inputs(spec: tasks.TaskSpec, seed: int) -> torch.Tensor:
    """Two sequences at the longest evaluation length, for the λ profile."""
    T = max(spec.eval_lens)
    if isinstance(spec, tasks.MQARSpec):
        return tasks.mq.generate(2, T, spec.eval_pairs, tasks.mq.MQARVocab(spec.vocab_size), seed).inputs
    if isinstance(spec, tasks.CopySpec):
        return tasks.cp.generate(2, T, spec.num_tokens, tasks.cp.CopyVocab(spec.vocab_size), seed).inputs
    val = tasks.load_text(spec.text, spec.val_fraction).val
    n = min(2, (val.numel() - 1) // T)
    return val[:n * T].view(n, T) if n else val[None, :min(val.numel(), T)]


def train_model(job: Job, device: torch.device, steps: int, time_cap: float
                ) -> tuple[torch.nn.Module, dict]:
    variant = VARIANTS[job.variant]
    vocab = tasks.vocab_size(job.task)
    model = build(variant, job.shape, vocab, device, job.seed)
    p = job.plan
    cfg = TrainConfig(steps=steps, batch_size=0, lr=p.lr, warmup=min(p.warmup, max(steps // 10, 1)),
                      weight_decay=p.weight_decay, amp=True, eval_every=0, time_budget=time_cap,
                      seed=job.seed, progress_interval=60.0)
    sampler = tasks.sampler(job.task, p.batch_tokens, device)
    with training_attention(ATTENTION):
        res = train(model, sampler, cfg, device, desc=job_name(job))
    losses = res.train_losses
    tail = [loss for _, loss in losses[-max(len(losses) // 10, 1):]]
    info = {"params": count_parameters(model), "steps": res.steps_run, "planned_steps": steps,
            "train_seconds": round(res.seconds, 2), "stopped_by_budget": res.stopped_by_budget,
            "first_loss": losses[0][1] if losses else None,
            "final_loss": sum(tail) / len(tail) if tail else None,
            "loss_curve": [[s, round(v, 4)] for s, v in losses[::max(len(losses) // 20, 1)]]}
    return model, info


def run_job(job: Job) -> dict:
    """Train and evaluate; never raises (an error or a skip is reported in the result)."""
    head = {"task": job.task.name, "variant": job.variant, "seed": job.seed, "name": job_name(job)}
    t0 = time.time()
    if job.deadline and t0 + job.expected_seconds > job.deadline:
        return {**head, "status": "skipped", "reason": "not enough time left before the study's deadline",
                "wall_seconds": 0.0}
    try:
        torch.set_num_threads(job.threads)
        device = torch.device(job.device)
        time_cap = job.plan.time_cap
        if job.deadline:  # leave the evaluation its budget before the deadline
            left = job.deadline - time.time() - job.plan.eval_budget
            time_cap = max(min(time_cap, left) if time_cap else left, 1.0)
        model, info = train_model(job, device, job.plan.steps, time_cap)
        model.eval()
        variant = VARIANTS[job.variant]
        model_dir = None
        if variant.servable and not isinstance(job.task, tasks.LMSpec):
            model_dir = Path(job.work_dir) / job_name(job)
            save_weights(model, model_dir, torch.float32)
            tasks.save_tokenizer(job.task, model_dir, model.config.max_model_len)
        t = time.perf_counter()
        rows = tasks.evaluate(job.task, model, device, model_dir, job.seed, job.plan.eval_budget,
                              lambda: forward_context(device))
        eval_seconds = time.perf_counter() - t
        profile = level_scale_profile(model, profile_inputs(job.task, job.seed), device)
        result = {**head, "status": "ok", **info, "eval_seconds": round(eval_seconds, 2),
                  "servable": variant.servable, "eval": rows, "lambda_by_level": profile}
    except Exception as e:  # reported, so that one failed run does not end the study
        result = {**head, "status": "error", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]}
    result["wall_seconds"] = round(time.time() - t0, 2)
    gc.collect()  # the engine's pools hold reference cycles: free them before the next run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def warm_engine(spec: tasks.TaskSpec, variant: str, shape: Shape, device: torch.device,
                work_dir: Path) -> None:
    """Serve two short prompts (prefill and a few decode steps) from an untrained model directory, so
    that the engine's Triton kernels for this λ mode and λ-MLP size are compiled (and in the on-disk
    cache) before the workers start."""
    if isinstance(spec, tasks.LMSpec) or not VARIANTS[variant].servable:
        return
    model = build(VARIANTS[variant], shape, tasks.vocab_size(spec), device, 0)
    model_dir = work_dir / f"warmup-{spec.name}-{variant}"
    save_weights(model, model_dir, torch.float32)
    tasks.save_tokenizer(spec, model_dir, model.config.max_model_len)
    llm = tasks.load_llm(model_dir, device, max(spec.eval_lens))
    tasks.generate(llm, [[3] * min(spec.eval_lens), [4] * 5], 3)


def seconds_per_step(spec: tasks.TaskSpec, shape: Shape, plan: TrainPlan, device: torch.device,
                     variant: str = "mlp", min_steps: int = 4) -> float:
    """Mean seconds per training step over whole cycles of the task's length mixture (at least
    ``min_steps``), after a warm-up cycle (the slowest λ mode by default; one length per step)."""
    n = len(tasks.train_lengths(spec))
    n *= -(-min_steps // n)
    job = Job(spec, variant, 0, shape, plan, str(device), "")
    train_model(job, device, n, 0.0)
    if device.type == "cuda":
        torch.cuda.synchronize()
    _, info = train_model(job, device, n, 0.0)
    return info["train_seconds"] / n
