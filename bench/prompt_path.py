"""The prompt path: prompt-step time per prompt length, and a prompt-heavy serving workload offline,
with prompt steps replayed from CUDA graphs (the default) and run eagerly, in one run on one card.

Model: bench/engine.py's ~250M random model (bf16, fp32 state). Rows:
  - "prompt step": one request of N prompt tokens, max_tokens=1, alone (batch 1): the wall time of
    LLM.generate (one prompt step, one sample), the median of --reps runs after a warm-up;
  - "serving": --requests requests of --input-len random tokens, --output-len tokens each (EOS ignored,
    greedy) through LLM.generate with the engine's serving flags (max_num_seqs 256, max_model_len 2048,
    --budgets: max_num_batched_tokens / long_prefill_chunk pairs; eager prompt steps at the first pair
    only); output tok/s, the median time of decode-only and of mixed steps, and the p99 of all steps.

    python bench/prompt_path.py --out runs/prompt_path.json            # GPU
    python bench/prompt_path.py --tiny --out /tmp/prompt_path.json     # CPU smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from fenwick_llm.engine.stats import EngineStats

from engine import BIG, TINY, prompts, sync, write_model  # bench/engine.py: this folder is sys.path[0]
from fenwick_llm import LLM, SamplingParams


def prompt_step_rows(model_dir: Path, lens: list[int], graphs: bool, reps: int, vocab: int,
                     device: torch.device) -> list[dict[str, Any]]:
    longest = max(lens)
    llm = LLM(str(model_dir), device=str(device), max_num_seqs=1, max_model_len=longest + 1,
              max_num_batched_tokens=longest, long_prefill_chunk=longest,
              prefill_graph_max_tokens=None if graphs else 0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rows = []
    for n in lens:
        llm.generate(prompts(1, n, vocab, 0), params)  # warm-up (cuBLAS heuristics, allocator)
        times = []
        for r in range(reps):
            p = prompts(1, n, vocab, 1 + r)
            sync(device)
            t0 = time.perf_counter()
            llm.generate(p, params)
            sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append(dict(kind="prompt step", prompt_graphs=graphs, prompt_len=n,
                         ms=statistics.median(times), min_ms=min(times)))
        print(rows[-1], flush=True)
    del llm
    return rows


def serving_row(model_dir: Path, a: argparse.Namespace, budget: int, chunk: int, graphs: bool,
                device: torch.device, vocab: int) -> dict[str, Any]:
    llm = LLM(str(model_dir), device=str(device), max_num_seqs=256, max_model_len=2048,
              max_num_batched_tokens=budget, long_prefill_chunk=chunk,
              prefill_graph_max_tokens=None if graphs else 0)
    params = SamplingParams(temperature=0.0, max_tokens=a.output_len, ignore_eos=True)
    llm.generate(prompts(min(a.requests, 16), a.input_len, vocab, 7), params)  # warm-up
    steps: list[tuple[float, EngineStats]] = []
    llm.engine.add_stats_listener(lambda s: steps.append((time.perf_counter(), s)))
    sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts(a.requests, a.input_len, vocab, 8), params)
    sync(device)
    wall = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    times = [t0] + [t for t, _ in steps]
    mixed = sorted((times[i + 1] - times[i]) * 1e3 for i, (_, s) in enumerate(steps)
                   if s.num_prompt_tokens and s.num_generation_tokens)
    decode = sorted((times[i + 1] - times[i]) * 1e3 for i, (_, s) in enumerate(steps)
                    if not s.num_prompt_tokens)
    q = (lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))] if xs else float("nan"))  # noqa: E731
    row = dict(kind="serving", prompt_graphs=graphs, max_num_batched_tokens=budget, long_prefill_chunk=chunk,
               requests=a.requests, input_len=a.input_len, output_len=a.output_len, wall_s=wall,
               output_tokens_per_s=tokens / wall, steps=len(steps),
               decode_step_ms_median=q(decode, 0.5), mixed_step_ms_median=q(mixed, 0.5),
               step_ms_p99=q(sorted(decode + mixed), 0.99))
    print(row, flush=True)
    del llm
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny model, short run (checks the script on CPU)")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=None,
                    help="default 128 512 1024 4096 16383 (tiny: 16 48)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--requests", type=int, default=None, help="serving workload (default 256; tiny: 8)")
    ap.add_argument("--input-len", type=int, default=None, help="default 1024 (tiny: 40)")
    ap.add_argument("--output-len", type=int, default=None, help="default 256 (tiny: 8)")
    ap.add_argument("--budgets", nargs="+", default=["2048:512"],
                    help="max_num_batched_tokens:long_prefill_chunk pairs for the serving rows")
    ap.add_argument("--no-eager", action="store_true", help="graph rows only")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")  # capture time and memory
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if a.tiny else BIG
    a.prompt_lens = a.prompt_lens or ([16, 48] if a.tiny else [128, 512, 1024, 4096, 16383])
    a.requests = a.requests or (8 if a.tiny else 256)
    a.input_len = a.input_len or (40 if a.tiny else 1024)
    a.output_len = a.output_len or (8 if a.tiny else 256)
    modes = [True] if a.no_eager or device.type != "cuda" else [False, True]  # the eager baseline first
    result: dict[str, Any] = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                                  command="python " + " ".join(sys.argv),
                                  rows=[])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "mlp", shape, "mlp", dtype, 0)
        for graphs in modes:
            result["rows"] += prompt_step_rows(model_dir, a.prompt_lens, graphs, a.reps, shape["vocab_size"],
                                               device)
            for pair in a.budgets if graphs else a.budgets[:1]:  # eager: the first pair, as a baseline
                budget, chunk = (int(x) for x in pair.split(":"))
                result["rows"].append(serving_row(model_dir, a, budget, chunk, graphs, device,
                                                  shape["vocab_size"]))
            a.out.parent.mkdir(parents=True, exist_ok=True)
            a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
