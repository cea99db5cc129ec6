"""Does adaptive decay deliver? The λ modes (and the λ-MLP ablations) on MQAR, selective copying and
character-level language modelling, trained at the same budget over several seeds, scored at 1×-8× the
longest training length. Design and results: docs/adaptive-decay.md.

    python -m fenwick_llm.tools.decay_study --out OUT --text data/tinyshakespeare.txt            # GPU
    python -m fenwick_llm.tools.decay_study --out OUT --text t.txt --preset smoke --device cpu   # ~1 min

The driver times a few training steps of each task (calibration), sets one step count per task so that
the whole sweep fits ``--budget`` seconds, runs the jobs (seed-major, so a cut-short study loses whole
seeds last) in ``--workers`` processes, and writes into OUT: study.json (everything), mqar.json,
copy.json, lm.json (per task: statistics and runs), summary.md, and one plot per task. The JSON files are
rewritten after every finished job, so a study stopped from outside still leaves its results.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from fenwick_llm.tools import decay_tasks as tasks
from fenwick_llm.tools.decay_job import Job, TrainPlan, job_name, run_job, seconds_per_step, warm_engine
from fenwick_llm.tools.decay_models import ABLATIONS, MAIN_VARIANTS, VARIANTS, Shape
from fenwick_llm.tools.decay_plots import plot_task
from fenwick_llm.tools.decay_stats import markdown, summarize_task


@dataclass(frozen=True)
class TaskPlan:
    spec: tasks.TaskSpec
    batch_tokens: int  # per step
    lr: float
    weight: float  # share of the training budget
    variants: tuple[str, ...]


@dataclass(frozen=True)
class Preset:
    shape: Shape
    tasks: tuple[TaskPlan, ...]
    budget: float  # seconds for the whole command
    workers: int
    seeds: int
    min_steps: int
    max_steps: int
    train_share: float = 0.65  # of the time left after calibration; the rest is evaluation
    warmup: int = 50


def preset(name: str, text: str | None) -> Preset:
    every, ablate = MAIN_VARIANTS, MAIN_VARIANTS + ABLATIONS
    text = text or ""
    if name == "gpu":  # one H100, ≈ 7 minutes
        return Preset(Shape(), (
            TaskPlan(tasks.MQARSpec(), 32768, 5e-3, 0.45, ablate),
            TaskPlan(tasks.CopySpec(), 32768, 5e-3, 0.35, every),  # learns slowest (CPU pilot)
            TaskPlan(tasks.LMSpec(text), 32768, 3e-3, 0.20, every),  # learns fastest
        ), budget=400, workers=3, seeds=3, min_steps=100, max_steps=4000)
    if name == "pilot":  # CPU, 2 cores: lengths 8× shorter than the GPU study
        lens = (256, 512, 1024, 2048)
        return Preset(Shape(hidden=64, layers=2, head_dim=64, state_size=32, lambda_levels=12), (
            TaskPlan(tasks.MQARSpec(vocab_size=128, train_mix=((32, 2), (64, 4), (128, 8), (256, 16)),
                                    eval_lens=lens, eval_pairs=16, examples=64), 2048, 5e-3, 0.45, ablate),
            TaskPlan(tasks.CopySpec(vocab_size=19, num_tokens=8, eval_lens=lens, examples=32,
                                    train_mix=((32, 2), (64, 4), (128, 8), (256, 8))),
                     2048, 5e-3, 0.25, every),
            TaskPlan(tasks.LMSpec(text, seq_len=256, eval_lens=lens), 2048, 5e-3, 0.30, every),
        ), budget=900, workers=2, seeds=3, min_steps=50, max_steps=2000, warmup=30)
    if name == "smoke":  # CPU, seconds: checks the plumbing, learns little
        lens = (32, 64, 128, 256)
        return Preset(Shape(hidden=32, layers=1, head_dim=16, state_size=8, lambda_levels=9), (
            TaskPlan(tasks.MQARSpec(vocab_size=31, train_mix=((16, 1), (32, 2)), eval_lens=lens, eval_pairs=2,
                                    examples=8), 256, 1e-2, 0.4, ablate),
            TaskPlan(tasks.CopySpec(vocab_size=8, num_tokens=3, train_mix=((16, 2), (32, 3)), eval_lens=lens,
                                    examples=8), 256, 1e-2, 0.3, every),
            TaskPlan(tasks.LMSpec(text, seq_len=32, eval_lens=lens), 256, 1e-2, 0.3, every),
        ), budget=60, workers=2, seeds=2, min_steps=4, max_steps=8, warmup=2)
    raise ValueError(f"unknown preset {name!r}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results folder (flat: 8 files)")
    p.add_argument("--text", default=None, help="training text for the language-modelling task")
    p.add_argument("--preset", choices=("gpu", "pilot", "smoke"), default="gpu")
    p.add_argument("--tasks", default="mqar,copy,lm", help="comma-separated subset of mqar,copy,lm")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole command")
    p.add_argument("--workers", type=int, default=None, help="worker processes sharing the device")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="fixed steps for every task (no calibration)")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of the variants (default: the preset's, per task)")
    p.add_argument("--device", default="auto")
    p.add_argument("--work", default=None, help="model directories for the engine (default: a temp dir)")
    return p.parse_args(argv)


def plan_steps(pre: Preset, taus: dict[str, float], counts: dict[str, int], left: float) -> dict[str, int]:
    """One step count per task: its weight's share of the training time, over its jobs, at the measured
    seconds per step (the device time of the jobs added up: workers share one device)."""
    train_total = left * pre.train_share
    weights = {tp.spec.name: tp.weight for tp in pre.tasks if tp.spec.name in taus}
    norm = sum(weights.values())
    return {t: max(pre.min_steps, min(pre.max_steps, int(train_total * w / norm / (counts[t] * taus[t]))))
            for t, w in weights.items()}


STATUSES = ("ok", "error", "skipped", "unfinished")


class Outputs:
    """The OUT folder: JSON (rewritten after each job), the markdown summary, and plots at the end."""

    def __init__(self, out: Path, header: dict, task_names: list[str], variants: dict[str, list[str]]):
        self.out, self.header, self.names, self.variants = out, header, task_names, variants
        self.jobs: list[dict] = []

    def write(self, final: bool) -> dict:
        summaries = {t: summarize_task(t, self.jobs, self.variants[t]) for t in self.names}
        status = {s: sum(j["status"] == s for j in self.jobs) for s in STATUSES}
        study = {**self.header, "finished": final, "status": status,
                 "wall_seconds": round(time.time() - self.header["started"], 1),
                 "summaries": summaries, "jobs": self.jobs}
        _write_json(self.out / "study.json", study)
        for t in self.names:
            _write_json(self.out / f"{t}.json", {"task": t, "wall_seconds": study["wall_seconds"],
                                                 "summary": summaries[t],
                                                 "jobs": [j for j in self.jobs if j["task"] == t]})
        md = f"# Adaptive-decay study ({self.header['device']})\n\n{markdown(summaries)}\n"
        (self.out / "summary.md").write_text(md)
        if final:
            try:
                for t in self.names:
                    plot_task(t, summaries[t], self.out / f"{t}.png",
                              f"{t}: mean ± 95 % t-interval over seeds ({self.header['device']})")
            except ImportError as e:  # results first: a device image without matplotlib still gets them
                study["plots"] = f"not drawn: {e}"
                _write_json(self.out / "study.json", study)
        return study


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    started = time.time()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    pre = preset(args.preset, args.text)
    pre = replace(pre, budget=args.budget or pre.budget, workers=args.workers or pre.workers,
                  seeds=args.seeds or pre.seeds)
    names = [t for t in args.tasks.split(",") if t]
    plans = [tp for tp in pre.tasks if tp.spec.name in names]
    if "lm" in names and not (args.text and Path(args.text).is_file()):
        raise SystemExit(f"the lm task needs --text PATH (a UTF-8 text file); got {args.text!r}")
    keep = args.variants.split(",") if args.variants else None
    if keep and not set(keep) <= set(VARIANTS):
        raise SystemExit(f"unknown variants {sorted(set(keep) - set(VARIANTS))}; known: {list(VARIANTS)}")
    variants = {tp.spec.name: [v for v in tp.variants if keep is None or v in keep] for tp in plans}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="decay_study_"))
    work.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    threads = max(1, (os.cpu_count() or 1) // pre.workers)
    torch.set_num_threads(threads)

    t_calib = time.time()
    taus = {tp.spec.name: 0.0 if args.steps else seconds_per_step(
        tp.spec, pre.shape, TrainPlan(steps=1, batch_tokens=tp.batch_tokens, lr=tp.lr, warmup=1), device)
        for tp in plans}
    warm_errors = warm_engines(plans, variants, pre.shape, device, work)
    calib_seconds = time.time() - t_calib
    counts = {tp.spec.name: pre.seeds * len(variants[tp.spec.name]) for tp in plans}
    n_jobs = sum(counts.values())
    left = pre.budget - (time.time() - started) - 10.0  # 10 s for the summary and plots
    steps = {k: args.steps for k in counts} if args.steps else plan_steps(pre, taus, counts, left)
    eval_budget = max(left * (1 - pre.train_share) * pre.workers / n_jobs, 5.0)
    deadline = started + pre.budget - 10.0
    jobs = make_jobs(pre, plans, variants, steps, taus, eval_budget, device, work, deadline, threads)
    header = {"command": "python -m fenwick_llm.tools.decay_study " + shlex.join(argv), "preset": args.preset,
              "device": name, "torch": torch.__version__, "started": started, "budget_seconds": pre.budget,
              "workers": pre.workers, "seeds": pre.seeds, "shape": asdict(pre.shape),
              "tasks": {tp.spec.name: {"spec": asdict(tp.spec), "batch_tokens": tp.batch_tokens, "lr": tp.lr,
                                       "steps": steps[tp.spec.name], "variants": variants[tp.spec.name],
                                       "seconds_per_step": round(taus[tp.spec.name], 4)} for tp in plans},
              "calibration_seconds": round(calib_seconds, 1), "eval_budget_per_job": round(eval_budget, 1),
              "engine_warmup_errors": warm_errors,
              "attention": "chunked (tools/chunk_attn.py), chunk 64", "jobs_planned": n_jobs}
    print(f"[decay] {name}: {n_jobs} jobs on {pre.workers} workers; steps {steps}; s/step "
          f"{ {k: round(v, 4) for k, v in taus.items()} }; eval {eval_budget:.0f} s/job; calibration "
          f"{calib_seconds:.0f} s", flush=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    outputs = Outputs(out, header, [tp.spec.name for tp in plans], variants)
    run_pool(jobs, pre.workers, started + pre.budget, outputs)
    study = outputs.write(final=True)
    print(f"[decay] done in {study['wall_seconds']:.0f} s: {study['status']}; results in {out}", flush=True)
    return study


def warm_engines(plans: list[TaskPlan], variants: dict[str, list[str]], shape: Shape, device: torch.device,
                 work: Path) -> list[str]:
    """Compile the engine's kernels for every served variant before the workers start; failures are
    reported, not raised (each run's evaluation reports its own)."""
    errors = []
    for tp in plans:
        for v in variants[tp.spec.name]:
            try:
                warm_engine(tp.spec, v, shape, device, work)
            except Exception as e:
                errors.append(f"{tp.spec.name}-{v}: {type(e).__name__}: {e}")
                print(f"[decay] engine warm-up failed: {errors[-1]}", flush=True)
    return errors


def make_jobs(pre: Preset, plans: list[TaskPlan], variants: dict[str, list[str]], steps: dict[str, int],
              taus: dict[str, float], eval_budget: float, device: torch.device, work: Path, deadline: float,
              threads: int) -> list[Job]:
    """Seed-major: every variant of every task at seed 0, then seed 1, ... (a study cut short loses whole
    seeds last). Training is capped at 3× its share of the device (×workers: they share it); with fixed
    --steps (no timing) only the deadline caps it."""
    jobs = []
    for seed in range(pre.seeds):
        for tp in plans:
            name = tp.spec.name
            est = steps[name] * taus[name]
            plan = TrainPlan(steps=steps[name], batch_tokens=tp.batch_tokens, lr=tp.lr, warmup=pre.warmup,
                             time_cap=3.0 * pre.workers * est + 30.0 if est else 0.0, eval_budget=eval_budget)
            jobs += [Job(tp.spec, v, seed, pre.shape, plan, str(device), str(work), deadline,
                         expected_seconds=pre.workers * est + eval_budget, threads=threads)
                     for v in variants[name]]
    return jobs


def run_pool(jobs: list[Job], workers: int, hard_stop: float, outputs: Outputs) -> None:
    """Run the jobs on ``workers`` spawned processes, in order; past ``hard_stop`` the rest are abandoned."""
    pool = mp.get_context("spawn").Pool(workers)
    pending = {i: pool.apply_async(run_job, (job,)) for i, job in enumerate(jobs)}
    try:
        while pending and time.time() < hard_stop:
            done = [i for i, r in pending.items() if r.ready()]
            for i in done:
                res = pending.pop(i).get()
                outputs.jobs.append(res)
                extra = res.get("error") or res.get("reason") or f"{res.get('steps')} steps"
                print(f"[decay] {res['name']}: {res['status']} in {res['wall_seconds']:.0f} s ({extra})",
                      flush=True)
                outputs.write(final=False)
            time.sleep(0.2)
    finally:
        for i in pending:
            j = jobs[i]
            outputs.jobs.append({"task": j.task.name, "variant": j.variant, "seed": j.seed,
                                 "name": job_name(j), "status": "unfinished", "wall_seconds": 0.0})
        if pending:
            pool.terminate()
        else:
            pool.close()
        pool.join()


if __name__ == "__main__":
    main()
