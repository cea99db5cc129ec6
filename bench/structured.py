"""Structured-outputs benchmark, one command: grammar compile time over the schema suite, the engine's
token-mask time per step at several batch sizes, and HTTP output throughput with a JSON schema against
unconstrained decoding on the same `fenwick serve`, in one run.

1. compile: every schema of tests/data/json_schemas.json, uncached, as the server compiles it (objects
   closed) for the model's tokenizer: p50 / p99 / max.
2. masks: the engine's own path (engine/structured_output.py) at each --batches size, sequences spread
   over the suite's schemas and walked at random to different depths: per step, the host's fill of the
   bitmask (llguidance's thread pool from 4 rows) and the bitmask's application to [B, vocab] logits
   (kernels.apply_token_bitmask_, synchronised), mean and p99 over --mask-steps steps.
3. HTTP: `fenwick serve` started here; --num-prompts completions at --concurrency in flight, each
   --output-len tokens (unconstrained with ignore_eos; constrained by an array-of-records schema long
   enough that the grammar never ends first), alternating the two for --rounds rounds; output tok/s.

    # GPU (makes the random ~259 M model of bench/serve_h200.sh if it is missing):
    python bench/structured.py --model /tmp/fenwick-250m --make-model --device cuda --out runs/structured.json
    # CPU at tiny scale (tests/test_bench_structured.py runs this):
    python bench/structured.py --model models/fenwick-shakespeare --device cpu --batches 1 4 \\
        --concurrency 4 --num-prompts 8 --output-len 16 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from server_up import wait_healthy

REPO = Path(__file__).resolve().parent.parent
SCHEMAS: dict[str, dict] = json.loads((REPO / "tests" / "data" / "json_schemas.json").read_text())
RECORDS = {  # the throughput schema: structure in every token, never complete before max_tokens
    "type": "array", "minItems": 1, "maxItems": 100000,
    "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "maxLength": 12},
        "tags": {"type": "array", "maxItems": 3, "items": {"enum": ["red", "green", "blue"]}},
        "ok": {"type": "boolean"}}, "required": ["id", "name", "tags", "ok"]}}
PROMPT = "Here are the records as JSON:"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def bench_compile(model: Path) -> dict[str, Any]:
    from fenwick_llm.engine.grammar import compiler_for
    from fenwick_llm.engine.model_config import ModelConfig
    from fenwick_llm.engine.structured_params import StructuredOutputsParams
    from fenwick_llm.engine.tokenizer import Tokenizer
    from fenwick_llm.server.structured import closed_objects

    tok = Tokenizer.from_dir(model)
    vocab = ModelConfig.from_file(model / "config.json").vocab_size
    t0 = time.perf_counter()
    compiler = compiler_for(tok, vocab, [tok.eos_token_id or 0])
    setup = time.perf_counter() - t0
    ms = [compiler.compile(StructuredOutputsParams(json=closed_objects(s))).compile_seconds * 1e3
          for s in SCHEMAS.values()]
    return {"tokenizer_setup_s": setup, "schemas": len(ms), "compile_ms_p50": pct(ms, 50),
            "compile_ms_p99": pct(ms, 99), "compile_ms_max": max(ms)}


def bench_masks(model: Path, device: str, batches: list[int], steps: int, seed: int) -> dict[str, Any]:
    from fenwick_llm.engine.grammar import compiler_for
    from fenwick_llm.engine.model_config import ModelConfig
    from fenwick_llm.engine.request import Request
    from fenwick_llm.engine.sampling_params import SamplingParams
    from fenwick_llm.engine.structured_output import StructuredOutputs
    from fenwick_llm.engine.structured_params import StructuredOutputsParams
    from fenwick_llm.engine.tokenizer import Tokenizer
    from fenwick_llm.server.structured import closed_objects

    from fenwick_llm import kernels

    tok = Tokenizer.from_dir(model)
    vocab = ModelConfig.from_file(model / "config.json").vocab_size
    dev = torch.device(device)
    compiler = compiler_for(tok, vocab, [tok.eos_token_id or 0])
    specs = [StructuredOutputsParams(json=closed_objects(s)) for s in SCHEMAS.values()]
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    for batch in batches:
        so = StructuredOutputs(compiler, dev, batch)
        seqs = []
        for i in range(batch):
            params = SamplingParams(structured_outputs=specs[i % len(specs)])
            r = Request(f"b{i}", None, [1], params, max_tokens=1)
            so.add(r)
            seqs.append(r.seqs[0])
        logits = torch.randn(batch, vocab, device=dev)
        fill_ms, apply_ms = [], []
        live = list(seqs)
        for step in range(steps + 24):  # the first 24 steps, untimed, spread the depths
            if not live:
                break
            t0 = time.perf_counter()
            mask = so.masks(live)
            t1 = time.perf_counter()
            assert mask is not None
            kernels.apply_token_bitmask_(logits[:len(live)], mask.bitmask, mask.rows)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            t2 = time.perf_counter()
            if step >= 24:
                fill_ms.append((t1 - t0) * 1e3)
                apply_ms.append((t2 - t1) * 1e3)
            words = mask.bitmask.cpu().numpy().view(np.uint8)
            bits = np.unpackbits(words, axis=1, bitorder="little")[:, :vocab]
            still = []
            for row, seq in enumerate(live):
                allowed = np.flatnonzero(bits[row])
                token = int(allowed[rng.randrange(len(allowed))]) if len(allowed) else 0
                if so.accept(seq, token) is None:
                    still.append(seq)
                else:  # finished: a fresh request with the same schema takes its place
                    so.release(seq.request)
                    r = Request(f"r{step}-{row}", None, [1], seq.request.params, max_tokens=1)
                    so.add(r)
                    still.append(r.seqs[0])
            live = still
        out[str(batch)] = {"fill_ms_mean": float(np.mean(fill_ms)), "fill_ms_p99": pct(fill_ms, 99),
                           "apply_ms_mean": float(np.mean(apply_ms)), "apply_ms_p99": pct(apply_ms, 99),
                           "steps": len(fill_ms)}
    return out


async def _load(url: str, constrained: bool, n: int, concurrency: int, output_len: int) -> dict[str, float]:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": output_len, "temperature": 1.0}
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "records", "schema": RECORDS}}
    else:
        body["ignore_eos"] = True
    sem = asyncio.Semaphore(concurrency)
    tokens, failed = 0, 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> None:
            nonlocal tokens, failed
            async with sem:
                r = await client.post(f"{url}/v1/completions", json={**body, "seed": i})
                if r.status_code != 200:
                    failed += 1
                    return
                tokens += r.json()["usage"]["completion_tokens"]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"output_tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "failed": failed}


def bench_http(a: argparse.Namespace) -> dict[str, Any]:
    port = a.port
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fenwick_llm.server", "serve", "--model", str(a.model), "--device", a.device,
           "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", str(max(a.concurrency, 8)),
           "--max-model-len", str(a.output_len + 64), "--log-level", "warning"]
    log = open(Path(tempfile.gettempdir()) / f"bench-structured-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
    try:
        wait_healthy(url, proc, 600, log.name)
        for constrained in (False, True):  # warm-up: graphs, the grammar's compile
            asyncio.run(_load(url, constrained, a.concurrency, a.concurrency, 8))
        runs: dict[str, list[dict[str, float]]] = {"unconstrained": [], "json_schema": []}
        for _ in range(a.rounds):
            for name, constrained in (("unconstrained", False), ("json_schema", True)):
                run = _load(url, constrained, a.num_prompts, a.concurrency, a.output_len)
                runs[name].append(asyncio.run(run))
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    mean = {k: float(np.mean([r["tok_s"] for r in v])) for k, v in runs.items()}
    compiles = [m for m in metrics.splitlines() if m.startswith("fenwick_grammar_compile_seconds_count")]
    return {"command": " ".join(cmd), "runs": runs, "tok_s": mean,
            "ratio": mean["json_schema"] / mean["unconstrained"], "grammar_compiles": compiles}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--make-model", action="store_true", help="write a random ~259 M model there if missing")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--mask-steps", type=int, default=100)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    a.model = a.model.resolve()
    if a.make_model and not (a.model / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "fenwick_llm.tools.make_random_model", "--hidden", "768",
                        "--layers", "24", "--out", str(a.model)], check=True)
    device = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    result: dict[str, Any] = {"device": device, "model": str(a.model), "argv": sys.argv}
    result["compile"] = bench_compile(a.model)
    print(json.dumps({"compile": result["compile"]}), flush=True)
    result["masks"] = bench_masks(a.model, a.device, a.batches, a.mask_steps, a.seed)
    print(json.dumps({"masks": result["masks"]}), flush=True)
    if not a.skip_http:
        result["http"] = bench_http(a)
        print(json.dumps({"http": {k: result["http"][k] for k in ("tok_s", "ratio")}}), flush=True)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
