"""Serving benchmark: TTFT, TPOT, inter-token latency and throughput of a running `fenwick serve`, under load.

In the manner of `vllm bench serve`, with its definitions, per request:
    TTFT  send -> first streamed text;      ITL   gaps between consecutive streamed texts
    E2EL  send -> end of the stream;        TPOT  (E2EL - TTFT) / (output tokens - 1)
and per run: request and token throughput over the run's wall time; mean / median / p99 of each.

Prompts are token-id lists (the completions API takes them), so input lengths are exact; output lengths
are fixed by max_tokens with ignore_eos. Requests arrive as a Poisson process at --request-rate
(gamma with --burstiness) or all at once, at most --max-concurrency in flight; several concurrencies
make a sweep with a throughput-against-concurrency plot. Targets must be loopback addresses.

    python bench/serve.py --base-url http://127.0.0.1:8000 --input-len 1024 --output-len 256 \
        --max-concurrency 1 16 64 256 --prompts-per-concurrency 4 --result-dir runs/serve

Datasets: random (no reuse), shared-prefix (every prompt starts with one of --num-prefixes prefixes of
--prefix-len tokens), multi-turn (bench/multi_turn.py: conversations through chat completions, each turn
re-sending the history). Runs report the prompt tokens the server restored from its prefix cache
(usage.prompt_tokens_details.cached_tokens) and the prompt tokens it prefilled (its /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import random
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np

# Text for the token pool when no --vocab-size is given: tokenized once by the server's /tokenize.
POOL_TEXT = (
    "The quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches. "
    "Serving engines batch requests continuously, prefill long prompts in chunks and decode one token "
    "per step for every running request; throughput and latency trade against each other as load grows. "
    "Numbers 0 1 2 3 4 5 6 7 8 9, punctuation ; : ! ? ( ) [ ] { } and words of many lengths."
)


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server restored from its prefix cache
    ttft: float = 0.0  # seconds
    e2el: float = 0.0  # seconds
    itl: list[float] = field(default_factory=list)  # seconds between streamed texts
    sent_at: float = 0.0  # seconds since the run started
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


@dataclass
class Load:
    max_concurrency: int | None  # None: unbounded
    request_rate: float  # requests/s; inf: all at once
    burstiness: float  # gamma shape of the inter-arrival times; 1 = Poisson
    num_prompts: int


def check_loopback(base_url: str) -> None:
    host = urlsplit(base_url).hostname or ""
    addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    if not addrs or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise SystemExit(f"bench/serve.py: {base_url} is not a loopback address; this benchmark only "
                         "targets a server on this machine (127.0.0.0/8 or ::1)")


def token_pool(client: httpx.Client, model: str, vocab_size: int | None) -> list[int]:
    if vocab_size:
        return list(range(vocab_size))
    r = client.post("/tokenize", json={"model": model, "prompt": POOL_TEXT, "add_special_tokens": False})
    r.raise_for_status()
    return sorted(set(r.json()["tokens"]))


def make_prompts(pool: list[int], n: int, input_len: int, prefix_len: int, num_prefixes: int,
                 seed: int) -> list[list[int]]:
    """n prompts of prefix_len shared tokens (one of num_prefixes prefixes) + input_len random tokens."""
    rng = random.Random(seed)
    prefixes = [rng.choices(pool, k=prefix_len) for _ in range(max(num_prefixes, 1))]
    return [prefixes[i % len(prefixes)] + rng.choices(pool, k=input_len) for i in range(n)]


async def send(client: httpx.AsyncClient, body: dict, prompt_len: int, t0: float) -> RequestResult:
    res = RequestResult(ok=False, prompt_tokens=prompt_len)
    start = time.perf_counter()
    res.sent_at = start - t0
    last, chunks, buf = start, 0, b""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            # raw bytes split into SSE events by hand: httpx's line iterator costs more than the server
            async for piece in r.aiter_raw():
                now = time.perf_counter()  # when these bytes arrived, before any parsing
                *events, buf = (buf + piece).split(b"\n\n")
                for event in events:
                    if not event.startswith(b"data:"):
                        continue
                    data = event[5:].strip()
                    if data == b"[DONE]":
                        break
                    msg = json.loads(data)
                    if "error" in msg:
                        res.error = str(msg["error"])[:300]
                        return res
                    if any(c.get("text") for c in msg.get("choices") or ()):
                        if chunks == 0:
                            res.ttft = now - start
                        else:
                            res.itl.append(now - last)
                        chunks, last = chunks + 1, now
                    if msg.get("usage"):
                        res.output_tokens = msg["usage"]["completion_tokens"]
                        res.prompt_tokens = msg["usage"]["prompt_tokens"]
                        details = msg["usage"].get("prompt_tokens_details") or {}
                        res.cached_tokens = details.get("cached_tokens") or 0
        res.e2el = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = chunks > 0
        res.error = "" if res.ok else "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


@dataclass(frozen=True)
class Share:
    """One client process's part of a run: its prompts and its slice of the concurrency and the rate."""

    base_url: str
    headers: dict[str, str]
    body: dict  # the request body without the prompt
    prompts: list[list[int]]
    max_concurrency: int | None
    request_rate: float
    burstiness: float
    max_duration: float  # seconds after t0 to keep starting requests
    request_timeout: float
    seed: int
    t0: float  # perf_counter (CLOCK_MONOTONIC, shared by the processes) at which to start


async def run_share(share: Share) -> tuple[list[RequestResult], float]:
    """Send a share's prompts; returns its results and the perf_counter time its last request ended."""
    rng = random.Random(share.seed)
    conns = share.max_concurrency or len(share.prompts)
    sem = asyncio.Semaphore(conns)
    limits = httpx.Limits(max_connections=conns + 4, max_keepalive_connections=conns + 4)
    timeout = httpx.Timeout(share.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=share.base_url, headers=share.headers, limits=limits,
                                 timeout=timeout) as client:

        async def one(p: list[int]) -> RequestResult | None:
            async with sem:
                if time.perf_counter() - share.t0 > share.max_duration:
                    return None
                return await send(client, {**share.body, "prompt": p}, len(p), share.t0)

        await asyncio.sleep(max(0.0, share.t0 - time.perf_counter()))
        tasks = []
        for p in share.prompts:
            if time.perf_counter() - share.t0 > share.max_duration:
                break
            tasks.append(asyncio.create_task(one(p)))
            if math.isfinite(share.request_rate):
                theta = 1.0 / (share.request_rate * share.burstiness)
                await asyncio.sleep(rng.gammavariate(share.burstiness, theta))
            else:
                await asyncio.sleep(0)  # let it start, so send order is arrival order
        results = [r for r in await asyncio.gather(*tasks) if r is not None]
    return results, time.perf_counter()


_barrier = None  # set in each client process: all of them wait on it once, so all have started


def init_worker(barrier: Any) -> None:
    global _barrier
    _barrier = barrier


def started(_: int) -> int:
    _barrier.wait(timeout=120)
    return os.getpid()


def run_share_in_process(share: Share) -> tuple[list[dict], float]:
    results, end = asyncio.run(run_share(share))
    return [asdict(r) for r in results], end


def run_load(pool: ProcessPoolExecutor | None, workers: int, prompts: list[list[int]], load: Load, base: dict,
             a: argparse.Namespace, seed: int) -> tuple[list[RequestResult], float]:
    """One run, split over `workers` client processes (one Python process cannot parse the SSE of
    hundreds of fast streams without falling behind). Each takes every workers-th prompt, its part of
    the concurrency and rate/workers of the arrivals: independent Poisson processes add up to one."""
    workers = max(1, min(workers, len(prompts), load.max_concurrency or len(prompts)))
    t0 = time.perf_counter() + (1.0 if workers > 1 else 0.0)
    shares = [
        Share(a.base_url, a.headers, base, prompts[i::workers],
              None if load.max_concurrency is None else len(range(i, load.max_concurrency, workers)),
              load.request_rate / workers, load.burstiness, a.max_duration, a.request_timeout,
              seed * 1000 + i, t0)
        for i in range(workers)
    ]
    if workers == 1 or pool is None:
        results, end = asyncio.run(run_share(shares[0]))
        return results, end - t0
    done = [f.result() for f in [pool.submit(run_share_in_process, sh) for sh in shares]]
    results = [RequestResult(**r) for rs, _ in done for r in rs]
    results.sort(key=lambda r: r.sent_at)
    return results, max(end for _, end in done) - t0


def stats_ms(xs: list[float], percentiles: tuple[float, ...]) -> dict[str, float]:
    if not xs:
        return {}
    a = np.asarray(xs) * 1000.0
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    out.update({f"p{p:g}": float(np.percentile(a, p)) for p in percentiles})
    return out


def summarize(load: Load, results: list[RequestResult], duration: float,
              percentiles: tuple[float, ...]) -> dict:
    ok = [r for r in results if r.ok]
    n_in = sum(r.prompt_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    n_cached = sum(r.cached_tokens for r in ok)
    return {
        **asdict(load),
        "request_rate": load.request_rate if math.isfinite(load.request_rate) else "inf",
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10],
        "duration_s": duration,
        "total_input_tokens": n_in,
        "total_output_tokens": n_out,
        "total_cached_tokens": n_cached,
        "prefix_cache_hit_rate": n_cached / n_in if n_in else 0.0,
        "request_throughput": len(ok) / duration,
        "output_throughput": n_out / duration,
        "total_token_throughput": (n_in + n_out) / duration,
        "mean_in_flight": sum(r.e2el for r in ok) / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok], percentiles),
        "tpot_ms": stats_ms([t for r in ok if (t := r.tpot) is not None], percentiles),
        "itl_ms": stats_ms([x for r in ok for x in r.itl], percentiles),
        "e2el_ms": stats_ms([r.e2el for r in ok], percentiles),
    }


SERVER_SAMPLES = ("fenwick_state_", "fenwick_prefix_cache_", "fenwick_prompt_tokens_total")


def server_gauges(client: httpx.Client) -> dict[str, float]:
    """State memory and slots, prefix-cache counters and prompt tokens prefilled from /metrics ({} if it is
    not there)."""
    try:
        text = client.get("/metrics").text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(SERVER_SAMPLES) and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def server_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the server counted during a run: prompt tokens prefilled, prefix-cache lookups and hits."""
    keys = ("fenwick_prompt_tokens_total", "fenwick_prefix_cache_queries_total",
            "fenwick_prefix_cache_hits_total")
    return {k: after[k] - before.get(k, 0.0) for k in keys if k in after}


def label(run: dict) -> str:
    c = run["max_concurrency"]
    return f"concurrency {c}" if c else f"rate {run['request_rate']}/s"


def plot(runs: list[dict], samples: list[dict[str, list[float]]], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    names = ("Time to first token", "Time per output token", "Inter-token latency", "End-to-end latency")
    for ax, key, name in zip(axes.flat, ("ttft", "tpot", "itl", "e2el"), names, strict=True):
        for run, s in zip(runs, samples, strict=True):
            xs = np.sort(np.asarray(s[key]) * 1000.0)
            if len(xs):
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=label(run))
        ax.set(title=name, xlabel="ms", ylabel="fraction of samples", ylim=(0, 1.01))
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"Latency CDFs: {title}")
    fig.tight_layout()
    paths.append(out_dir / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    sweep = [r for r in runs if r["max_concurrency"]]
    if len(sweep) >= 2:
        c = [r["max_concurrency"] for r in sweep]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
        a1.plot(c, [r["output_throughput"] for r in sweep], "o-", label="output tokens/s")
        a1.plot(c, [r["total_token_throughput"] for r in sweep], "s--", label="input + output tokens/s")
        a1.set(title="Throughput", xlabel="max concurrency", ylabel="tokens / s")
        for key, name, style in (("ttft_ms", "TTFT", "o-"), ("tpot_ms", "TPOT", "s-")):
            for stat in ("median", "p99"):
                a2.plot(c, [r[key].get(stat, np.nan) for r in sweep], style,
                        alpha=1.0 if stat == "median" else 0.5, label=f"{stat} {name}")
        a2.set(title="Latency", xlabel="max concurrency", ylabel="ms")
        a2.set_yscale("log")
        for ax in (a1, a2):
            ax.set_xscale("log", base=2)
            ax.set_xticks(c, [str(x) for x in c])
            ax.minorticks_off()
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(title)
        fig.tight_layout()
        paths.append(out_dir / "throughput_vs_concurrency.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def print_run(run: dict) -> None:
    print(f"==== {label(run)}: {run['completed']} ok, {run['failed']} failed in {run['duration_s']:.2f} s")
    print(f"  requests/s {run['request_throughput']:.2f}   output tok/s {run['output_throughput']:.1f}   "
          f"total tok/s {run['total_token_throughput']:.1f}")
    counted = run.get("server_counted") or {}
    if run["total_input_tokens"]:
        prefilled = counted.get("fenwick_prompt_tokens_total", float("nan"))
        print(f"  prompt tokens sent {run['total_input_tokens']}, cached {run['total_cached_tokens']} "
              f"(hit rate {run['prefix_cache_hit_rate']:.1%}), prefilled by the server {prefilled:.0f}")
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = run[key]
        if s:
            print(f"  {key[:-3].upper():5s} ms  mean {s['mean']:9.2f}  median {s['median']:9.2f}  "
                  f"p99 {s.get('p99', float('nan')):9.2f}")
    for e in run["errors"]:
        print(f"  error: {e}")


def bench(a: argparse.Namespace) -> dict:
    a.headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    with httpx.Client(base_url=a.base_url, headers=a.headers, timeout=30.0) as sync:
        model = a.model or sync.get("/v1/models").json()["data"][0]["id"]
        pool_ids = token_pool(sync, model, a.vocab_size)
        loads = [Load(c, a.request_rate, a.burstiness,
                      max(a.num_prompts, math.ceil(a.prompts_per_concurrency * c))
                      if a.prompts_per_concurrency and c else a.num_prompts)
                 for c in a.max_concurrency or [None]]
        base = {"model": model, "max_tokens": a.output_len, "ignore_eos": True, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        most = max(ld.max_concurrency or ld.num_prompts for ld in loads)
        workers = a.num_workers or min(max(1, (os.cpu_count() or 2) // 2), math.ceil(most / 32))
        runs, samples = [], []
        spawn = get_context("spawn")
        pool = (ProcessPoolExecutor(workers, mp_context=spawn, initializer=init_worker,
                                    initargs=(spawn.Barrier(workers),)) if workers > 1 else nullcontext())
        with pool as pp:
            if pp is not None:  # start (and import) every client process before any clock runs
                list(pp.map(started, range(workers)))
            if a.num_warmups:
                warm = make_prompts(pool_ids, a.num_warmups, a.input_len, a.prefix_len, a.num_prefixes,
                                    a.seed - 1)
                run_load(None, 1, warm, Load(None, math.inf, 1.0, len(warm)), base, a, a.seed)
            for i, load in enumerate(loads):
                # fresh prompts per run (the same shared prefixes), so no run reuses another's prompts
                prompts = make_prompts(pool_ids, load.num_prompts, a.input_len, a.prefix_len, a.num_prefixes,
                                       a.seed + 1000 * (i + 1))
                before = server_gauges(sync)
                results, duration = run_load(pp, workers, prompts, load, base, a, a.seed + i)
                run = summarize(load, results, duration, tuple(a.percentiles))
                run["client_processes"] = max(1, min(workers, load.max_concurrency or load.num_prompts))
                run["server"] = server_gauges(sync)
                run["server_counted"] = server_deltas(before, run["server"])
                ok = [r for r in results if r.ok]
                samples.append({"ttft": [r.ttft for r in ok], "itl": [x for r in ok for x in r.itl],
                                "tpot": [t for r in ok if (t := r.tpot) is not None],
                                "e2el": [r.e2el for r in ok]})
                if a.save_requests:
                    run["requests"] = [{**asdict(r), "tpot": r.tpot} for r in results]
                runs.append(run)
                print_run(run)
    result = {
        "benchmark": "serve", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "base_url": a.base_url,
        "model": model, "dataset": a.dataset, "input_len": a.input_len, "output_len": a.output_len,
        "prefix_len": a.prefix_len, "num_prefixes": a.num_prefixes, "num_warmups": a.num_warmups,
        "seed": a.seed, "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "runs": runs,
    }
    a.result_dir.mkdir(parents=True, exist_ok=True)
    (a.result_dir / "serve.json").write_text(json.dumps(result, indent=2))
    title = f"{model}, input {a.prefix_len + a.input_len} / output {a.output_len} tokens"
    result["plots"] = [str(p) for p in plot(runs, samples, a.result_dir, title)]
    (a.result_dir / "serve.json").write_text(json.dumps(result, indent=2))
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="a loopback server")
    p.add_argument("--model", help="served model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("FENWICK_API_KEY"))
    p.add_argument("--dataset", choices=["random", "shared-prefix", "multi-turn"], default="random")
    p.add_argument("--input-len", type=int, default=1024, help="random tokens per prompt (after any prefix)")
    p.add_argument("--output-len", type=int, default=256, help="max_tokens, with ignore_eos")
    p.add_argument("--prefix-len", type=int, default=0, help="shared-prefix: tokens of the shared prefix")
    p.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct prefixes")
    p.add_argument("--vocab-size", type=int, help="draw ids from [0, N) (default: /tokenize of a text)")
    p.add_argument("--num-turns", type=int, default=8, help="multi-turn: turns per conversation")
    p.add_argument("--num-conversations", type=int, default=0,
                   help="multi-turn: conversations per run (default: the concurrency)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per run (at least this many)")
    p.add_argument("--prompts-per-concurrency", type=float, help="requests per run = this x concurrency")
    p.add_argument("--max-concurrency", type=int, nargs="+", help="one run per value (default: unbounded)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default: inf)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    p.add_argument("--num-workers", type=int, default=0,
                   help="client processes (default: one per 32 concurrent streams, at most half the cores)")
    p.add_argument("--num-warmups", type=int, default=2, help="requests sent before the measured runs")
    p.add_argument("--max-duration", type=float, default=600.0, help="seconds per run to keep sending")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds for one request")
    p.add_argument("--percentiles", type=float, nargs="+", default=[90.0, 99.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-requests", action="store_true", help="keep every request's record in the JSON")
    p.add_argument("--result-dir", type=Path, default=Path("runs/serve"))
    a = p.parse_args(argv)
    if a.dataset == "shared-prefix" and a.prefix_len <= 0:
        p.error("--dataset shared-prefix needs --prefix-len > 0")
    if a.dataset == "random":
        a.prefix_len = 0
    if a.num_prompts + (a.prompts_per_concurrency or 0) * max(a.max_concurrency or [0]) > 100_000:
        p.error("at most 100000 requests per run")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    check_loopback(a.base_url)
    if a.dataset == "multi-turn":
        from multi_turn import bench_multi_turn  # bench/ is the script's folder, first on sys.path

        result = bench_multi_turn(a)
    else:
        result = bench(a)
    failed = sum(r["failed"] for r in result["runs"])
    print(f"wrote {a.result_dir / 'serve.json'} and {len(result['plots'])} plot(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
