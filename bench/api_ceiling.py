"""How many streamed tokens per second the API server processes can push: `fenwick serve`'s API servers
(server/api_server.py, unchanged) in front of a fake engine core that speaks the core's protocol
(engine/messages.py) but runs no model: every --step-ms it gives each running request one random token.
bench/serve.py drives it over HTTP; the API servers' CPU time per token is what this prints.

    python bench/api_ceiling.py --model /tmp/tiny-rand --api-server-count 1 --concurrency 64 256
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import msgspec
import zmq
from fenwick_llm.engine.messages import (
    ClientInputs,
    CoreInput,
    EngineInfo,
    Hello,
    RequestDelta,
    SampleDelta,
    Shutdown,
    StepOutputs,
)
from fenwick_llm.engine.stats import EngineStats
from fenwick_llm.server.api_server import ApiServerArgs, run_api_server
from fenwick_llm.server.config import ServerConfig

HERE = Path(__file__).resolve().parent


def fake_core(address: str, step_s: float, vocab: int) -> None:
    """The core's protocol without a model: one token per running request per step."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(address)
    decode, encode = msgspec.msgpack.Decoder(CoreInput).decode, msgspec.msgpack.Encoder().encode
    running: dict[str, tuple[bytes, int, int]] = {}  # id -> (owner, tokens so far, max_tokens)
    clients: list[bytes] = []
    rng = random.Random(0)
    next_step = time.monotonic()
    while True:
        timeout = max(0.0, next_step - time.monotonic()) if running else None
        if sock.poll(None if timeout is None else int(timeout * 1000) + 1):
            while True:
                try:
                    identity, payload = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                msg = decode(payload)
                if isinstance(msg, Shutdown):
                    return
                if isinstance(msg, Hello):
                    clients.append(identity)
                elif isinstance(msg, ClientInputs):
                    for add in msg.adds:
                        running[add.request_id] = (identity, 0, add.max_tokens)
                    for rid in msg.aborts:
                        running.pop(rid, None)
                        out = StepOutputs([RequestDelta(rid, [], finished=True)])
                        sock.send_multipart([identity, encode(out)])
        if not running or time.monotonic() < next_step:
            continue
        next_step = time.monotonic() + step_s
        outbox: dict[bytes, list[RequestDelta]] = {}
        for rid, (owner, n, limit) in list(running.items()):
            done = n + 1 >= limit
            sample = SampleDelta(0, [rng.randrange(3, vocab)], None, "length" if done else None)
            outbox.setdefault(owner, []).append(RequestDelta(rid, [sample], finished=done))
            if done:
                del running[rid]
            else:
                running[rid] = (owner, n + 1, limit)
        stats = [EngineStats(num_running=len(running), num_generation_tokens=len(running),
                             inter_token_latencies=[step_s] * len(running))]
        for identity, deltas in outbox.items():
            msg = StepOutputs(deltas, stats if clients and identity == clients[0] else [])
            sock.send_multipart([identity, encode(msg)])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a model directory (its tokenizer and config are read)")
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--stream-interval", type=int, default=1)
    p.add_argument("--concurrency", type=int, nargs="+", default=[64])
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=2.0)
    p.add_argument("--max-duration", type=float, default=15.0)
    p.add_argument("--port", type=int, default=8470)
    p.add_argument("--result-dir", type=Path, default=Path("runs/api-ceiling"))
    a = p.parse_args()
    cfg = json.loads((Path(a.model) / "config.json").read_text())
    workdir = Path(f"/tmp/api-ceiling-{os.getpid()}")
    (workdir / "metrics").mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(workdir / "metrics")
    address = f"ipc://{workdir}/core"
    spawn = multiprocessing.get_context("spawn")
    core = spawn.Process(target=fake_core, args=(address, a.step_ms / 1000, cfg["vocab_size"]), daemon=True)
    core.start()
    info = EngineInfo(model=a.model, served_model_name="fake", max_model_len=4096,
                      vocab_size=cfg["vocab_size"], max_num_seqs=4096, max_waiting=4096,
                      eos_token_ids=frozenset({0}))
    config = ServerConfig(port=a.port, log_level="warning", stream_interval=a.stream_interval,
                          metrics_dir=str(workdir / "metrics"), max_connections=8192)
    args = ApiServerArgs(config, info, address, core.pid or 0, os.getpid())
    servers = [spawn.Process(target=run_api_server, args=(args,), daemon=True)
               for _ in range(a.api_server_count)]
    for s in servers:
        s.start()
    print(f"fake core pid {core.pid}, API server pids {[s.pid for s in servers]}", flush=True)
    url = f"http://127.0.0.1:{a.port}"
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    for c in a.concurrency:
        before = sum(cpu_seconds(s.pid or 0) for s in servers)
        out = a.result_dir / f"c{c}"
        subprocess.run([sys.executable, str(HERE / "serve.py"), "--base-url", url, "--vocab-size",
                        str(cfg["vocab_size"]), "--input-len", str(a.input_len),
                        "--output-len", str(a.output_len),
                        "--max-concurrency", str(c), "--prompts-per-concurrency", "4", "--num-warmups", "0",
                        "--max-duration", str(a.max_duration), "--result-dir", str(out)],
                       check=True, stdout=subprocess.DEVNULL)
        used = sum(cpu_seconds(s.pid or 0) for s in servers) - before
        run = json.loads((out / "serve.json").read_text())["runs"][0]
        tokens = run["total_output_tokens"]
        print(f"concurrency {c}: {run['output_throughput']:.0f} tok/s, {run['failed']} failed, API servers "
              f"{used:.2f} CPU s = {used / max(tokens, 1) * 1e6:.1f} us per token, TPOT median "
              f"{run['tpot_ms'].get('median', float('nan')):.2f} ms", flush=True)
    for s in servers:
        s.terminate()
        s.join(30)
    core.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
