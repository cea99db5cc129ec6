"""Multi-turn chat for `bench/serve.py --dataset multi-turn`: conversations through /v1/chat/completions, each
turn re-sending the whole history (system prompt, earlier user messages and the assistant's replies as
returned), as chat clients do.

A conversation: an optional system prompt of --prefix-len tokens (shared by every conversation), then
--num-turns user messages of --input-len tokens (random ids from the token pool, as text through
/detokenize), each answered with --output-len tokens (greedy, ignore_eos). At most --max-concurrency
conversations run at once, each turn after the previous one's reply; --num-conversations per run (default:
the concurrency). Reported per turn index: TTFT, prompt tokens and the share the server restored from its
prefix cache (usage.prompt_tokens_details.cached_tokens); per run: hit rate, throughput, the prompt tokens
the server prefilled (its /metrics), and with --save-requests every reply, to compare two runs.

    python bench/serve.py --dataset multi-turn --num-turns 8 --input-len 768 --output-len 384 \\
        --max-concurrency 32 --vocab-size 32000 --result-dir runs/multi-turn
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from serve import server_deltas, server_gauges, stats_ms, token_pool


@dataclass
class TurnResult:
    conversation: int
    turn: int  # 0-based turn index
    ok: bool = False
    prompt_tokens: int = 0
    cached_tokens: int = 0  # restored from the server's prefix cache
    output_tokens: int = 0
    ttft: float = 0.0  # seconds
    e2el: float = 0.0  # seconds
    text: str = ""  # the reply, re-sent in the next turn
    tokens: list[str] = field(default_factory=list)  # with --save-requests: the reply's tokens
    gaps: list[float] = field(default_factory=list)  # and the logprob gap of each to the runner-up
    error: str = ""


async def chat_turn(client: httpx.AsyncClient, body: dict, res: TurnResult) -> TurnResult:
    """One streamed chat completion: TTFT at the first content, usage from the final chunk."""
    start = time.perf_counter()
    buf, pieces = b"", []
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return res
            async for piece in r.aiter_raw():
                now = time.perf_counter()
                *events, buf = (buf + piece).split(b"\n\n")
                for event in events:
                    data = event[5:].strip() if event.startswith(b"data:") else b"[DONE]"
                    if data == b"[DONE]":
                        continue
                    msg = json.loads(data)
                    if "error" in msg:
                        res.error = str(msg["error"])[:300]
                        return res
                    choices = msg.get("choices") or ()
                    text = "".join((c.get("delta") or {}).get("content") or "" for c in choices)
                    for c in choices:  # logprobs when asked for: where two runs' replies part, how close
                        for e in (c.get("logprobs") or {}).get("content") or ():
                            top = [t["logprob"] for t in e.get("top_logprobs") or ()]
                            res.tokens.append(e["token"])
                            res.gaps.append(top[0] - top[1] if len(top) > 1 else float("inf"))
                    if text:
                        if not pieces:
                            res.ttft = now - start
                        pieces.append(text)
                    if msg.get("usage"):
                        usage = msg["usage"]
                        res.prompt_tokens = usage["prompt_tokens"]
                        res.output_tokens = usage["completion_tokens"]
                        details = usage.get("prompt_tokens_details") or {}
                        res.cached_tokens = details.get("cached_tokens") or 0
        res.e2el = time.perf_counter() - start
        res.text = "".join(pieces)
        res.ok = bool(pieces)
        res.error = "" if res.ok else "no tokens streamed"
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        res.error = f"{type(e).__name__}: {e}"[:300]
    return res


async def converse(client: httpx.AsyncClient, index: int, system: str, users: list[str],
                   base: dict) -> list[TurnResult]:
    messages = [{"role": "system", "content": system}] if system else []
    results = []
    for turn, text in enumerate(users):
        messages.append({"role": "user", "content": text})
        res = await chat_turn(client, {**base, "messages": list(messages)}, TurnResult(index, turn))
        results.append(res)
        if not res.ok:
            break
        messages.append({"role": "assistant", "content": res.text})
    return results


async def run_conversations(a: argparse.Namespace, system: str, convs: list[list[str]], base: dict,
                            concurrency: int) -> tuple[list[TurnResult], float]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(a.request_timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=a.base_url, headers=a.headers, limits=limits,
                                 timeout=timeout) as client:

        async def one(i: int, users: list[str]) -> list[TurnResult]:
            async with sem:
                return await converse(client, i, system, users, base)

        start = time.perf_counter()
        done = await asyncio.gather(*(one(i, users) for i, users in enumerate(convs)))
        return [r for rs in done for r in rs], time.perf_counter() - start


def texts(sync: httpx.Client, model: str, pool: list[int], rng: random.Random, n: int,
          length: int) -> list[str]:
    """n texts of ``length`` random tokens from the pool, through /detokenize."""
    out = []
    for _ in range(n):
        r = sync.post("/detokenize", json={"model": model, "tokens": rng.choices(pool, k=length)})
        r.raise_for_status()
        out.append(r.json()["prompt"])
    return out


def summarize_turns(results: list[TurnResult], duration: float, concurrency: int, num_turns: int,
                    percentiles: tuple[float, ...]) -> dict:
    ok = [r for r in results if r.ok]
    n_in, n_cached = sum(r.prompt_tokens for r in ok), sum(r.cached_tokens for r in ok)
    n_out = sum(r.output_tokens for r in ok)
    per_turn = []
    for t in range(num_turns):
        rs = [r for r in ok if r.turn == t]
        sent, cached = sum(r.prompt_tokens for r in rs), sum(r.cached_tokens for r in rs)
        per_turn.append({"turn": t + 1, "completed": len(rs), "mean_prompt_tokens": sent / max(len(rs), 1),
                         "hit_rate": cached / sent if sent else 0.0,
                         "ttft_ms": stats_ms([r.ttft for r in rs], percentiles)})
    return {
        "max_concurrency": concurrency, "conversations": len({r.conversation for r in results}),
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:10], "duration_s": duration,
        "total_input_tokens": n_in, "total_cached_tokens": n_cached, "total_output_tokens": n_out,
        "prefix_cache_hit_rate": n_cached / n_in if n_in else 0.0,
        "request_throughput": len(ok) / duration, "output_throughput": n_out / duration,
        "ttft_ms": stats_ms([r.ttft for r in ok], percentiles),
        "e2el_ms": stats_ms([r.e2el for r in ok], percentiles), "turns": per_turn,
    }


def print_turns(run: dict) -> None:
    print(f"==== concurrency {run['max_concurrency']}: {run['conversations']} conversations, "
          f"{run['completed']} turns ok, {run['failed']} failed in {run['duration_s']:.2f} s")
    print(f"  requests/s {run['request_throughput']:.2f}   output tok/s {run['output_throughput']:.1f}   "
          f"prefix-cache hit rate {run['prefix_cache_hit_rate']:.1%}")
    print("  turn  prompt tokens  hit rate  TTFT ms mean / median / p99")
    for t in run["turns"]:
        s = t["ttft_ms"]
        if s:
            print(f"  {t['turn']:4d}  {t['mean_prompt_tokens']:13.0f}  {t['hit_rate']:8.1%}  "
                  f"{s['mean']:9.2f} / {s['median']:9.2f} / {s.get('p99', float('nan')):9.2f}")
    for e in run["errors"]:
        print(f"  error: {e}")


def plot_turns(runs: list[dict], out_dir: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        turns = [t for t in run["turns"] if t["ttft_ms"]]
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot([t["turn"] for t in turns], [t["ttft_ms"][stat] for t in turns], style,
                    label=f"concurrency {run['max_concurrency']}, {stat}")
    ax.set(title=f"TTFT per turn: {title}", xlabel="turn", ylabel="ms")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "ttft_per_turn.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def bench_multi_turn(a: argparse.Namespace) -> dict:
    a.headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else {}
    with httpx.Client(base_url=a.base_url, headers=a.headers, timeout=30.0) as sync:
        model = a.model or sync.get("/v1/models").json()["data"][0]["id"]
        pool = token_pool(sync, model, a.vocab_size)
        # special tokens kept in the reply's text: a random model samples them, and re-sent they must come
        # back as themselves
        base = {"model": model, "max_tokens": a.output_len, "ignore_eos": True, "temperature": 0.0,
                "skip_special_tokens": False, "stream": True, "stream_options": {"include_usage": True}}
        if a.save_requests:  # to tell near-ties from real differences when two runs are compared
            base.update(logprobs=True, top_logprobs=2)
        rng = random.Random(a.seed)
        system = texts(sync, model, pool, rng, 1, a.prefix_len)[0] if a.prefix_len else ""
        if a.num_warmups:
            warm = texts(sync, model, pool, random.Random(a.seed - 1), a.num_warmups, a.input_len)
            asyncio.run(run_conversations(a, "", [[w] for w in warm], base, a.num_warmups))
        runs = []
        for i, concurrency in enumerate(a.max_concurrency or [1]):
            n = a.num_conversations or concurrency
            rng = random.Random(a.seed + 1000 * (i + 1))  # fresh conversations per run
            users = texts(sync, model, pool, rng, n * a.num_turns, a.input_len)
            convs = [users[c * a.num_turns:(c + 1) * a.num_turns] for c in range(n)]
            before = server_gauges(sync)
            results, duration = asyncio.run(run_conversations(a, system, convs, base, concurrency))
            run = summarize_turns(results, duration, concurrency, a.num_turns, tuple(a.percentiles))
            run["server"] = server_gauges(sync)
            run["server_counted"] = server_deltas(before, run["server"])
            if a.save_requests:
                run["requests"] = [asdict(r) for r in sorted(results, key=lambda r: (r.conversation, r.turn))]
            runs.append(run)
            print_turns(run)
    result = {
        "benchmark": "serve", "dataset": "multi-turn", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "base_url": a.base_url, "model": model, "num_turns": a.num_turns, "input_len": a.input_len,
        "output_len": a.output_len, "prefix_len": a.prefix_len, "seed": a.seed,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "runs": runs,
    }
    a.result_dir.mkdir(parents=True, exist_ok=True)
    title = f"{model}, {a.num_turns} turns of {a.input_len} + {a.output_len} tokens"
    result["plots"] = [str(p) for p in plot_turns(runs, a.result_dir, title)]
    (a.result_dir / "serve.json").write_text(json.dumps(result, indent=2))
    return result
