"""The prefix cache's cost on traffic with no reuse: offline LLM.generate of random prompts, cache on vs off.

Two engines on one model, one with the cache and one without; each repetition sends both the same fresh
random prompts (so nothing is ever reused: only the snapshots' saves, evictions and lookups cost), in
alternating order; reported: median wall time per engine, the overhead, the share of time the snapshot
copies took, and what the cache did. Runs on the CPU (tiny models, the default demo model) and on a GPU.

    python bench/prefix_cache_overhead.py                       # the demo model, on the CPU here
    python bench/prefix_cache_overhead.py --model /tmp/fenwick-250m --num-prompts 256 --input-len 1024 \\
        --output-len 256 --max-num-seqs 64 --json runs/overhead.json      # on a GPU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from fenwick_llm.engine import LLM, SamplingParams
from fenwick_llm.engine.prefix_cache import Tier
from fenwick_llm.models import demo_model_dir


def sync(llm: LLM) -> None:
    if llm.config.torch_device.type == "cuda":
        torch.cuda.synchronize()


def timed_copies(llm: LLM) -> list[float]:
    """Wrap the runner's snapshot copies to time them (synchronised on a GPU): seconds per call."""
    runner, spent = llm.engine.runner, []
    inner = runner.copy_snapshots

    def copy(copies: list) -> None:
        if copies:
            sync(llm)
            t = time.perf_counter()
            inner(copies)
            sync(llm)
            spent.append(time.perf_counter() - t)

    runner.copy_snapshots = copy
    return spent


def timed_bookkeeping(llm: LLM) -> list[float]:
    """Wrap the prefix cache's scheduler hooks (tree walks, rows, eviction) to time them."""
    cache, spent = llm.engine.prefix_cache, []
    assert cache is not None
    for name in ("begin_step", "take_ops", "restore", "next_point", "prompt_chunk_done", "sequence_finished"):
        inner = getattr(cache, name)

        def hook(*args, _inner=inner, **kwargs):
            t = time.perf_counter()
            out = _inner(*args, **kwargs)
            spent.append(time.perf_counter() - t)
            return out

        setattr(cache, name, hook)
    return spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(demo_model_dir()))
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    p.add_argument("--time-copies", action="store_true",
                   help="also time the snapshot copies (synchronising a GPU) and the cache's bookkeeping")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    kw = dict(device=a.device, max_num_seqs=a.max_num_seqs, max_model_len=a.max_model_len)
    engines = {"on": LLM(a.model, **kw), "off": LLM(a.model, enable_prefix_caching=False, **kw)}
    copies = timed_copies(engines["on"]) if a.time_copies else []
    books = timed_bookkeeping(engines["on"]) if a.time_copies else []
    vocab = engines["on"].engine.model_config.vocab_size
    params = SamplingParams(max_tokens=a.output_len, temperature=0.0, ignore_eos=True)
    times: dict[str, list[float]] = {"on": [], "off": []}
    for rep in range(a.reps + 1):  # the first is a warm-up
        rng = random.Random(rep)
        prompts = [[rng.randrange(1, vocab) for _ in range(a.input_len)] for _ in range(a.num_prompts)]
        for name in (("on", "off") if rep % 2 else ("off", "on")):
            llm = engines[name]
            sync(llm)
            start = time.perf_counter()
            llm.generate(prompts, params)
            sync(llm)
            if rep:
                times[name].append(time.perf_counter() - start)
    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    cache = engines["on"].engine.prefix_cache
    assert cache is not None
    stats = cache.take_stats()
    tokens = a.num_prompts * (a.input_len + a.output_len)
    result = {
        "model": a.model, "device": str(engines["on"].config.torch_device),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "args": {k: str(v) for k, v in vars(a).items()}, "command": " ".join(sys.argv),
        "bytes_per_snapshot": engines["on"].engine.pool.bytes_per_slot,
        "snapshot_rows": {"device": cache.config.device_rows, "host": cache.config.host_rows},
        "rows_used": {"device": cache.num_rows(Tier.DEVICE), "host": cache.num_rows(Tier.HOST)},
        "seconds_on": times["on"], "seconds_off": times["off"], "median_on": on, "median_off": off,
        "overhead": on / off - 1, "tokens_per_s_on": tokens / on, "tokens_per_s_off": tokens / off,
        "hits_tokens_last_rep": stats.hits,
        "copy_seconds_per_rep": sum(copies) / (a.reps + 1) if copies else None,
        "bookkeeping_seconds_per_rep": sum(books) / (a.reps + 1) if books else None,
    }
    print(f"{a.num_prompts} prompts x ({a.input_len} + {a.output_len}) tokens, {a.reps} reps, "
          f"{result['device']}: cache on {on:.3f} s, off {off:.3f} s (medians): "
          f"overhead {result['overhead']:+.2%}; "
          f"spread on {min(times['on']):.3f}-{max(times['on']):.3f}, off {min(times['off']):.3f}-"
          f"{max(times['off']):.3f} s")
    if copies:
        spent = result["copy_seconds_per_rep"] + result["bookkeeping_seconds_per_rep"]
        print(f"snapshot copies {result['copy_seconds_per_rep']:.4f} s + bookkeeping "
              f"{result['bookkeeping_seconds_per_rep']:.4f} s per rep: {spent / off:.2%} of the cache-off "
              "time")
    print(f"snapshot: {result['bytes_per_snapshot'] / 2**20:.2f} MiB; rows {result['rows_used']} of "
          f"{result['snapshot_rows']}; hits {stats.hits} tokens")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
