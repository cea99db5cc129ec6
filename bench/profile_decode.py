"""Where a decode step's time goes on the GPU: graph replay time, kernels per step, and host time per stage.

Builds bench/engine.py's ~250M model (random weights), then for each batch size:
  1. replays the captured decode CUDA graph and times it with CUDA events (pure device time per step);
  2. profiles one eager decode step with torch.profiler (kernel count, top kernels by device time);
  3. runs LLM.generate and times each stage of EngineCore.step (schedule / model / sample / outputs)
     with a device synchronisation around each, so host overhead shows beside device time;
  4. (first) times a prompt-only request (max_tokens=1: the eager prefill step + one sample) and profiles
     it: wall time, summed kernel time, top kernels and top host ops, so launch/sync overhead shows.

    python bench/profile_decode.py --out /tmp/profile.txt            # H200
    python bench/profile_decode.py --tiny --out /tmp/profile.txt     # CPU smoke test
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import torch

from engine import BIG, TINY, prompts, sync, write_model
from fenwick_llm import LLM, SamplingParams


def timed(stats: dict[str, list[float]], name: str, fn, device: torch.device):
    """fn with a device synchronisation before and after: stats[name] gets the wall time of each call,
    stats[name + " host"] the time until it returned (before the closing synchronisation)."""
    def wrapper(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        stats[name + " host"].append(time.perf_counter() - t0)
        sync(device)
        stats[name].append(time.perf_counter() - t0)
        return out
    return wrapper


class CompileLog:
    """Records each Triton JIT compilation (kernel name, seconds) while active: a compile inside a timed
    run shows up here rather than as an unexplained slow step."""

    def __init__(self) -> None:
        self.events: list[tuple[str, float]] = []
        self._saved = None

    def __enter__(self) -> CompileLog:
        try:
            from triton.runtime.jit import JITFunction
        except ImportError:
            return self
        saved = self._saved = JITFunction._do_compile
        events = self.events

        def do_compile(fn, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return saved(fn, *args, **kwargs)
            finally:
                events.append((fn.__name__, time.perf_counter() - t0))
        JITFunction._do_compile = do_compile
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is not None:
            from triton.runtime.jit import JITFunction
            JITFunction._do_compile = self._saved


def kernel_table(prof, log, rows: int = 25) -> None:
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    log(f"    {len(kernels)} kernels, {sum(e.device_time for e in kernels) / 1e3:.3f} ms summed kernel time")
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in kernels:
        by_name[e.name[:90]].append(e.device_time)
    for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:rows]:
        log(f"    {sum(ts) / 1e3:8.3f} ms  {len(ts):5d}x  {sum(ts) / len(ts):7.2f} us  {name}")


def profile_prefill(llm: LLM, bs: int, prompt_len: int, vocab: int, device: torch.device, log) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    batch = prompts(bs, prompt_len, vocab, 3)
    llm.generate(batch, params)  # warm-up
    walls = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        llm.generate(batch, params)
        sync(device)
        walls.append(time.perf_counter() - t0)
    log(f"[prefill] batch {bs} x {prompt_len} tokens, max_tokens=1: wall {min(walls) * 1e3:.2f} ms "
        "(best of 3)")
    acts = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=acts) as prof:
        llm.generate(batch, params)
        sync(device)
    if device.type == "cuda":
        kernel_table(prof, log)
    log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def find_syncs(llm: LLM, bs: int, prompt_len: int, vocab: int, log) -> None:
    """Run a prompt-only batch with torch's sync debug mode on and list where the host waited for the
    device (each distinct stack once, with its count)."""
    import traceback
    import warnings
    seen: collections.Counter = collections.Counter()

    def show(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-2] if "/torch/" not in f.filename
                  and "/warnings.py" not in f.filename][-6:]
        where = "\n".join(f"      {Path(f.filename).name}:{f.lineno} {f.line}" for f in frames)
        seen[(str(message)[:70], where)] += 1

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    batch = prompts(bs, prompt_len, vocab, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            llm.generate(batch, params)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    log(f"[syncs] batch {bs} x {prompt_len}, max_tokens=1: {sum(seen.values())} synchronising calls")
    for (msg, stack), n in seen.most_common(12):
        log(f"    {n:4d}x {msg}\n{stack}")


def profiled(fn, profiles: list):
    """fn under cProfile; each call's profile is appended to ``profiles``."""
    import cProfile

    def wrapper(*args, **kwargs):
        prof = cProfile.Profile()
        prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            prof.disable()
            profiles.append(prof)
    return wrapper


def _top_functions(prof, n: int = 25, key: str = "tottime") -> str:
    import io
    import pstats
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(n)
    return "\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:6000]


def python_profile(llm: LLM, bs: int, prompt_len: int, vocab: int, log) -> None:
    """cProfile of one prompt-only batch: where the host's time goes in Python (top functions by own
    time), for a prompt step that is host bound."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    profs: list = []
    profiled(llm.generate, profs)(prompts(bs, prompt_len, vocab, 5), params)
    log(f"[python] batch {bs} x {prompt_len}, max_tokens=1, top functions by own time:")
    log(_top_functions(profs[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--mode", default="mlp")
    ap.add_argument("--max-num-seqs", type=int, help="state pool slots (default: the largest batch)")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--sync-debug", action="store_true", help="also list the host syncs of a prompt step")
    ap.add_argument("--python-profile", action="store_true", help="also cProfile a prompt step's host time")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lines: list[str] = []

    def log(s: str = "") -> None:
        print(s, flush=True)
        lines.append(s)

    prompt_len, new = (16, 8) if a.tiny else (512, 128)
    shape = TINY if a.tiny else BIG
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / a.mode, shape, a.mode, dtype, 0)
        llm = LLM(str(model_dir), device=str(device), dtype=dtype,
                  max_num_seqs=a.max_num_seqs or max(a.batches),
                  max_model_len=prompt_len + new, long_prefill_chunk=prompt_len,
                  max_num_batched_tokens=8192, cuda_graph_batch_sizes=tuple(a.batches),
                  enforce_eager=a.enforce_eager or device.type != "cuda")
    core = llm.engine
    runner, model, state = core.runner, core.model, core.pool.state
    log(f"device {device}, dtype {dtype}, mode {a.mode}, levels {state.levels[0].shape}, "
        f"token window {state.all_window is not None}")
    if a.python_profile:
        for bs in a.batches:
            python_profile(llm, bs, prompt_len, shape["vocab_size"], log)
    if a.sync_debug and device.type == "cuda":
        for bs in a.batches:
            find_syncs(llm, bs, prompt_len, shape["vocab_size"], log)
    for bs in a.batches:
        profile_prefill(llm, bs, prompt_len, shape["vocab_size"], device, log)
    for bs in a.batches:
        slots = torch.arange(bs, device=device)
        ids = torch.randint(1, shape["vocab_size"], (bs,), device=device)
        with torch.inference_mode():
            state.reset(slots)
            state.positions[slots] = 600 if not a.tiny else 10
            if runner.graphs is not None:
                for _ in range(3):
                    runner.decode(ids.tolist(), slots.tolist())
                sync(device)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                reps = 50
                start.record()
                for _ in range(reps):
                    runner.graphs.graphs[bs].replay()
                end.record()
                sync(device)
                log(f"[graph] batch {bs}: {start.elapsed_time(end) / reps:.3f} ms per decode step (replay)")
            model.decode(ids, state, slots)
            sync(device)
            acts = [torch.profiler.ProfilerActivity.CPU]
            if device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            with torch.profiler.profile(activities=acts) as prof:
                model.decode(ids, state, slots)
                sync(device)
        if device.type == "cuda":
            log(f"[eager] batch {bs}: one decode step")
            kernel_table(prof, log, rows=30)
        else:
            log(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15))
        stats: dict[str, list[float]] = collections.defaultdict(list)
        saved = (core.scheduler.schedule, core.runner.execute, core.sampler.sample, core.outputs.process)
        core.scheduler.schedule = timed(stats, "schedule", saved[0], device)
        profiles: list = []
        execute = profiled(saved[1], profiles) if a.python_profile else saved[1]
        core.runner.execute = timed(stats, "model", execute, device)
        core.sampler.sample = timed(stats, "sample", saved[2], device)
        core.outputs.process = timed(stats, "outputs (per seq)", saved[3], device)
        params = SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True)
        step_times: list[float] = []
        t_last = [0.0]

        def listener(_s, step_times=step_times, t_last=t_last) -> None:
            now = time.perf_counter()
            step_times.append(now - t_last[0])
            t_last[0] = now
        llm.generate(prompts(bs, prompt_len, shape["vocab_size"], 1), params)  # warm-up, as bench/engine.py
        stats.clear()
        prompt_tokens: list[int] = []
        core.add_stats_listener(lambda s, seen=prompt_tokens: seen.append(s.num_prompt_tokens))
        core.add_stats_listener(listener)
        sync(device)
        t0 = t_last[0] = time.perf_counter()
        with CompileLog() as compiles:
            llm.generate(prompts(bs, prompt_len, shape["vocab_size"], 2), params)
        sync(device)
        wall = time.perf_counter() - t0
        core.stats_listeners.clear()
        (core.scheduler.schedule, core.runner.execute, core.sampler.sample, core.outputs.process) = saved
        log(f"[generate] batch {bs}: {bs * new / wall:.1f} output tok/s (synchronised stages), "
            f"wall {wall:.3f} s, {len(step_times)} steps, "
            f"median step {sorted(step_times)[len(step_times) // 2] * 1e3:.3f} ms")
        for name, ts in stats.items():
            med = sorted(ts)[len(ts) // 2]
            log(f"    {name:20s} n={len(ts):5d} median {med * 1e3:8.3f} ms  total {sum(ts):7.3f} s  "
                f"max {max(ts) * 1e3:.2f} ms")
        log("    steps with prompt tokens (ms; 'host': until the call returned, before the device "
            "caught up):")
        stages = ("schedule", "model", "sample")
        for i, n in enumerate(prompt_tokens):
            if n:
                cols = "  ".join(f"{k} {stats[k][i] * 1e3:7.2f} (host {stats[k + ' host'][i] * 1e3:7.2f})"
                                 for k in stages if i < len(stats[k]))
                log(f"      step {i:3d}: {n:5d} prompt tokens, wall {step_times[i] * 1e3:7.2f}  {cols}")
        if profiles:  # the warm-up's calls came first
            steps = profiles[-len(prompt_tokens):]
            slow = max((i for i, n in enumerate(prompt_tokens) if n), key=lambda i: stats["model"][i])
            log(f"    [python] step {slow}, the slowest with prompt tokens, top functions by own time:")
            log(_top_functions(steps[slow]))
            log(_top_functions(steps[slow], 30, "cumulative"))
        log(f"    Triton compiles during the timed run: {len(compiles.events)}"
            + "".join(f"\n      {name} {sec:.2f} s" for name, sec in compiles.events[:10]))
    a.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
