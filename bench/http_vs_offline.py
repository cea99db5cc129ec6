"""What the server costs on top of the engine: the same workload offline (LLM.generate) and over HTTP
(`fenwick serve` + bench/serve.py), one after the other on one machine, and the ratio per concurrency.

Offline runs first, in a child process that exits before the server starts (so they never share the
GPU): per batch size B = concurrency, B random-token prompts at once (greedy, EOS ignored), after one
warm-up; and, for concurrency 1, the prompt step (a request of max_tokens=1) and the decode step
((one request of output-len tokens - the prompt step) / (output-len - 1)), medians of --step-repeats.
Then, for each --api-server-counts value, `fenwick serve` with the same engine flags and bench/serve.py
at each concurrency (4 x concurrency requests, at least 8), and the table:

    concurrency | offline tok/s | HTTP tok/s | HTTP / offline   (one HTTP column pair per API server count)
    concurrency 1: TTFT against the prompt step + 3 ms, TPOT against 1.1 x the decode step
    CPU ms per output token: the offline process, and the server's processes (all of them, summed)

    python bench/http_vs_offline.py --model /tmp/fenwick-250m --device cuda --dtype bfloat16 \
        --input-len 1024 --output-len 256 --concurrency 1 16 64 256 512 --max-num-seqs 256 \
        --max-model-len 2048 --api-server-counts 1 2 4 --result-dir runs/http-vs-offline
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from server_up import wait_healthy

HERE = Path(__file__).resolve().parent


def offline(a: argparse.Namespace) -> dict[str, Any]:
    """Runs in the child process: throughput per batch size and the batch-1 step times."""
    from fenwick_llm import LLM, SamplingParams

    llm = LLM(a.model, device=a.device, dtype=a.dtype, max_num_seqs=a.max_num_seqs,
              max_model_len=a.max_model_len, **json.loads(a.engine_args))
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(a.input_len)] for _ in range(n)]

    def timed(ps: list[list[int]], tokens: int) -> tuple[float, int]:
        sync()
        t0 = time.perf_counter()
        outs = llm.generate(ps, SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True))
        sync()
        return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)

    timed(prompts(max(a.concurrency)), 8)  # warm-up: every shape compiled, graphs captured
    result: dict[str, Any] = {"batches": {}}
    for b in a.concurrency:
        cpu = time.process_time()
        seconds, n = timed(prompts(b), a.output_len)
        cpu_ms = (time.process_time() - cpu) * 1e3 / n
        result["batches"][str(b)] = {"seconds": seconds, "output_tok_s": n / seconds,
                                     "cpu_ms_per_token": cpu_ms}
        print(f"offline batch {b}: {n / seconds:.1f} tok/s", file=sys.stderr, flush=True)
    prompt_s = statistics.median(timed(prompts(1), 1)[0] for _ in range(a.step_repeats))
    full_s = statistics.median(timed(prompts(1), a.output_len)[0] for _ in range(a.step_repeats))
    result["prompt_step_ms"] = prompt_s * 1e3
    result["decode_step_ms"] = (full_s - prompt_s) / (a.output_len - 1) * 1e3
    return result


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(a: argparse.Namespace, count: int | None, out_dir: Path) -> dict[str, Any]:
    """Start fenwick serve (count API servers; None: no flag), run bench/serve.py, stop the server."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fenwick_llm.server", "serve", "--model", a.model, "--port", str(port),
           "--device", a.device, "--dtype", a.dtype, "--max-num-seqs", str(a.max_num_seqs),
           "--max-model-len", str(a.max_model_len), *a.server_args.split()]
    if count is not None:
        cmd += ["--api-server-count", str(count)]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "server.log", "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_healthy(url, server, a.startup_timeout, out_dir / "server.log")
            vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
            runs = {}
            for i, c in enumerate(a.concurrency):  # one client run per level, to count the server's CPU
                client = [sys.executable, str(HERE / "serve.py"), "--base-url", url,
                          "--vocab-size", str(vocab), "--input-len", str(a.input_len),
                          "--output-len", str(a.output_len),
                          "--max-concurrency", str(c), "--prompts-per-concurrency", "4",
                          "--num-prompts", "8",
                          "--num-warmups", str(a.num_warmups if i == 0 else 0), "--seed", str(i),
                          "--max-duration", str(a.max_duration), "--request-timeout", "300",
                          "--result-dir", str(out_dir / f"c{c}")]
                cpu = tree_cpu_seconds(server.pid)
                subprocess.run(client, check=False, stdout=sys.stderr)
                cpu = tree_cpu_seconds(server.pid) - cpu
                run = json.loads((out_dir / f"c{c}" / "serve.json").read_text())["runs"][-1]
                run["server_cpu_ms_per_token"] = cpu * 1e3 / max(run["total_output_tokens"], 1)
                runs[str(c)] = run
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=90)
            except subprocess.TimeoutExpired:
                server.kill()
    (out_dir / "serve.json").write_text(json.dumps(runs, indent=2))
    return runs


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its descendants (Linux /proc)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            todo += [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                     for c in (t / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def report(a: argparse.Namespace, off: dict[str, Any], https: dict[str, dict[str, Any]]) -> str:
    head = "| concurrency | offline tok/s |" + "".join(f" HTTP tok/s ({k}) | HTTP / offline ({k}) |"
                                                     for k in https)
    lines = [head, "|" + "---|" * (2 + 2 * len(https))]
    cpu_head = "| concurrency | offline |" + "".join(f" HTTP ({k}) |" for k in https)
    cpu_lines = ["", "CPU ms per output token (the offline process; all of the server's processes):", "",
                 cpu_head, "|" + "---|" * (2 + len(https))]
    for c in map(str, a.concurrency):
        o = off["batches"][c]["output_tok_s"]
        row = f"| {c} | {o:.1f} |"
        cpu_row = f"| {c} | {off['batches'][c].get('cpu_ms_per_token', float('nan')):.3f} |"
        for runs in https.values():
            h = runs[c]["output_throughput"] if c in runs else float("nan")
            failed = f" ({runs[c]['failed']} failed)" if c in runs and runs[c]["failed"] else ""
            row += f" {h:.1f}{failed} | {h / o:.2f} |"
            cpu_row += f" {runs[c]['server_cpu_ms_per_token']:.3f} |" if c in runs else " |"
        lines.append(row)
        cpu_lines.append(cpu_row)
    lines += cpu_lines
    lines.append("")
    lines.append(f"offline batch 1: prompt step {off['prompt_step_ms']:.2f} ms, decode step "
                 f"{off['decode_step_ms']:.3f} ms")
    for k, runs in https.items():
        one = runs.get("1")
        if one and one["ttft_ms"]:
            ttft, tpot = one["ttft_ms"]["median"], one["tpot_ms"].get("median", float("nan"))
            lines.append(f"HTTP ({k}) concurrency 1: TTFT median {ttft:.2f} ms (target <= "
                         f"{off['prompt_step_ms'] + 3:.2f}), TPOT median {tpot:.3f} ms (target <= "
                         f"{1.1 * off['decode_step_ms']:.3f})")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256, 512])
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--engine-args", default="{}", help="more EngineConfig fields for LLM, as JSON")
    p.add_argument("--server-args", default="", help="more fenwick serve flags (match --engine-args)")
    p.add_argument("--api-server-counts", type=int, nargs="*", default=None,
                   help="one HTTP run per value (default: one run without the flag)")
    p.add_argument("--max-duration", type=float, default=60.0, help="bench/serve.py: seconds per level")
    p.add_argument("--num-warmups", type=int, default=4)
    p.add_argument("--step-repeats", type=int, default=5)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--skip-offline", type=Path, help="reuse the offline.json of an earlier run")
    p.add_argument("--result-dir", type=Path, default=Path("runs/http-vs-offline"))
    p.add_argument("--offline-worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.offline_worker:
        print(json.dumps(offline(a)))
        return 0
    a.result_dir.mkdir(parents=True, exist_ok=True)
    if a.skip_offline:
        off = json.loads(a.skip_offline.read_text())
    else:
        args = [arg for arg in (argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run([sys.executable, __file__, *args, "--offline-worker"], check=True,
                              stdout=subprocess.PIPE, text=True, env=os.environ)
        off = json.loads(proc.stdout.strip().splitlines()[-1])
        (a.result_dir / "offline.json").write_text(json.dumps(off, indent=2))
    counts: list[int | None] = list(a.api_server_counts) if a.api_server_counts else [None]
    https = {("default" if k is None else str(k)): http(a, k, a.result_dir / f"http-{k or 'default'}")
             for k in counts}
    table = report(a, off, https)
    (a.result_dir / "report.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
