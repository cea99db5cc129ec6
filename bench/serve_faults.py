"""Faults and endurance of `fenwick serve`'s processes, against a server this script starts and stops.

soak: --streams clients stream for --duration seconds, each request after the last; --leave-fraction of
the requests are abandoned at a random point (the client disconnects). Checks: no 5xx and no error event,
every state slot free afterwards, and no growth of any process's memory (RSS of the core and of each
API server, from a third of the run to its end, within --rss-slack).

kill-core: --streams long streams, then kill -9 of the engine core. Checks: every client gets an error
event or a closed stream within --deadline seconds, none hangs, and the server exits non-zero.

    python bench/serve_faults.py --model /tmp/fenwick-250m --device cuda --dtype bfloat16 \\
        --max-num-seqs 256 --max-model-len 2048 soak --streams 512 --duration 60
    python bench/serve_faults.py --model /tmp/fenwick-250m --device cuda ... kill-core --streams 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import httpx
from server_up import wait_healthy


class Server:
    """`fenwick serve` on a free port; its processes' pids from its log."""

    def __init__(self, a: argparse.Namespace) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = a.result_dir / "server.log"
        a.result_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "fenwick_llm.server", "serve", "--model", a.model,
               "--port", str(self.port), "--device", a.device, "--dtype", a.dtype,
               "--max-num-seqs", str(a.max_num_seqs),
               "--max-model-len", str(a.max_model_len), "--max-waiting", str(a.max_waiting),
               *a.server_args.split()]
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        wait_healthy(self.url, self.proc, a.startup_timeout, self.log_path)

    def pids(self) -> dict[str, int]:
        text = self.log_path.read_text(errors="replace")
        out = {"core": int(re.findall(r"engine core: pid (\d+)", text)[-1])}
        out.update({f"api-{i}": int(p) for i, p in re.findall(r"API server (\d+): pid (\d+)", text)})
        return out

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()
        return self.proc.returncode


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def one(client: httpx.AsyncClient, body: dict, leave_after: int | None, tally: dict[str, int]) -> None:
    """One streamed request; leave_after: disconnect after this many chunks."""
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            tally[f"status {r.status_code}"] = tally.get(f"status {r.status_code}", 0) + 1
            if r.status_code != 200:
                await r.aread()
                return
            chunks = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"error"' in line[:20]:
                    tally["error events"] = tally.get("error events", 0) + 1
                chunks += 1
                if leave_after is not None and chunks >= leave_after:
                    tally["left"] = tally.get("left", 0) + 1
                    return
    except httpx.HTTPError as e:
        key = f"client {type(e).__name__}"
        tally[key] = tally.get(key, 0) + 1


async def soak_share(url: str, streams: int, until: float, a: dict, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    tally: dict[str, int] = {}
    limits = httpx.Limits(max_connections=streams + 4, max_keepalive_connections=streams + 4)
    timeout = httpx.Timeout(600, connect=30)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:

        async def loop() -> None:
            while time.time() < until:
                body = {"prompt": [rng.randrange(3, a["vocab"]) for _ in range(a["input_len"])],
                        "max_tokens": a["output_len"], "ignore_eos": True, "temperature": 0.0, "stream": True}
                leave = rng.randrange(1, a["output_len"]) if rng.random() < a["leave_fraction"] else None
                await one(client, body, leave, tally)

        await asyncio.gather(*(loop() for _ in range(streams)))
    return tally


def run_share(args: tuple) -> dict[str, int]:
    return asyncio.run(soak_share(*args))


def soak(a: argparse.Namespace, server: Server) -> bool:
    vocab = json.loads((Path(a.model) / "config.json").read_text())["vocab_size"]
    shared = {"vocab": vocab, "input_len": a.input_len, "output_len": a.output_len,
              "leave_fraction": a.leave_fraction}
    workers = max(1, min(a.workers or (os.cpu_count() or 2) // 2, a.streams // 32 or 1))
    until = time.time() + a.duration
    pids = server.pids()
    samples: list[tuple[float, dict[str, float]]] = []
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        shares = [len(range(i, a.streams, workers)) for i in range(workers)]
        futures = [pool.submit(run_share, (server.url, n, until, shared, i)) for i, n in enumerate(shares)]
        while not all(f.done() for f in futures):
            alive = {k: p for k, p in pids.items() if Path(f"/proc/{p}").exists()}
            samples.append((time.time(), {k: rss_mb(p) for k, p in alive.items()}))
            time.sleep(1.0)
        tally: dict[str, int] = {}
        for f in futures:
            for k, v in f.result().items():
                tally[k] = tally.get(k, 0) + v
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (server.metric("fenwick_state_slots_used")
                                           or server.metric("fenwick_num_requests_running")):
        time.sleep(0.2)
    slots = server.metric("fenwick_state_slots_used")
    third = [s for t, s in samples if t >= until - a.duration * 2 / 3]
    growth = {k: third[-1][k] - third[0][k] for k in third[0] if k in third[-1]} if len(third) > 1 else {}
    fives = sum(v for k, v in tally.items() if k.startswith("status 5"))
    ok = fives == 0 and not tally.get("error events") and slots == 0 and all(
        g <= a.rss_slack * third[0][k] for k, g in growth.items())
    print(json.dumps({"scenario": "soak", "ok": ok, "tally": tally, "slots_used_after": slots,
                      "rss_mb_at_one_third": third[0] if third else {}, "rss_mb_growth": growth}, indent=2))
    return ok


async def kill_core(a: argparse.Namespace, server: Server) -> bool:
    body = {"prompt": "kill", "max_tokens": a.max_model_len // 2, "ignore_eos": True, "stream": True}
    ends: list[float] = []
    outcomes: dict[str, int] = {}

    async def stream(client: httpx.AsyncClient) -> None:
        kind = "finished"
        try:
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if '"error"' in line:
                        kind = "error event"
        except httpx.HTTPError:
            kind = "closed"
        ends.append(time.monotonic())
        outcomes[kind] = outcomes.get(kind, 0) + 1

    limits = httpx.Limits(max_connections=a.streams + 4)
    timeout = httpx.Timeout(600, connect=30)
    async with httpx.AsyncClient(base_url=server.url, timeout=timeout, limits=limits) as c:
        tasks = [asyncio.create_task(stream(c)) for _ in range(a.streams)]
        while await asyncio.to_thread(server.metric, "fenwick_num_requests_running") < min(a.streams,
                                                                                           a.max_num_seqs):
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        os.kill(server.pids()["core"], signal.SIGKILL)
        done, hung = await asyncio.wait(tasks, timeout=a.deadline + 30)
        for t in hung:
            t.cancel()
    exit_code = await asyncio.to_thread(server.proc.wait, a.deadline + 30)
    exited = time.monotonic() - killed
    slowest = max(ends) - killed if ends else float("inf")
    ok = not hung and slowest <= a.deadline and exit_code not in (0, None) and exited <= a.deadline + 5
    print(json.dumps({"scenario": "kill-core", "ok": ok, "outcomes": outcomes, "hung": len(hung),
                      "slowest_stream_end_s": slowest, "server_exit_code": exit_code,
                      "server_exit_s": exited}, indent=2))
    return ok


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-waiting", type=int, default=1024)
    p.add_argument("--server-args", default="", help="more fenwick serve flags ('--api-server-count 2')")
    p.add_argument("--startup-timeout", type=float, default=600.0)
    p.add_argument("--result-dir", type=Path, default=Path("runs/serve-faults"))
    sub = p.add_subparsers(dest="scenario", required=True)
    s = sub.add_parser("soak")
    s.add_argument("--streams", type=int, default=512)
    s.add_argument("--duration", type=float, default=60.0)
    s.add_argument("--leave-fraction", type=float, default=1 / 3)
    s.add_argument("--input-len", type=int, default=1024)
    s.add_argument("--output-len", type=int, default=256)
    s.add_argument("--workers", type=int, default=0, help="client processes (default: one per 32 streams)")
    s.add_argument("--rss-slack", type=float, default=0.05, help="allowed RSS growth, as a fraction")
    k = sub.add_parser("kill-core")
    k.add_argument("--streams", type=int, default=256)
    k.add_argument("--deadline", type=float, default=5.0, help="seconds for every stream to end")
    a = p.parse_args()
    server = Server(a)
    try:
        ok = soak(a, server) if a.scenario == "soak" else asyncio.run(kill_core(a, server))
    finally:
        server.stop()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
