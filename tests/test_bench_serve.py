"""bench/serve.py against a real CPU `fenwick serve` on 127.0.0.1 with a tiny random model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_utils import free_port, wait_healthy
from tiny import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench" / "serve.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = make_tiny_model(tmp_path_factory.mktemp("bench") / "tiny")
    port = free_port()
    log = open(tmp_path_factory.getbasetemp() / "bench-server.log", "w+b")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "fenwick_llm.server", "serve", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--max-num-seqs", "8", "--max-model-len", "256"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, lambda: log_tail(log))
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()


def log_tail(log) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-3000:]


def run_bench(url: str, out: Path, *args: str) -> dict:
    cmd = [sys.executable, str(BENCH), "--base-url", url, "--result-dir", str(out), "--save-requests", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return json.loads((out / "serve.json").read_text())


def check_run(run: dict, n: int, prompt_len: int, output_len: int) -> None:
    assert run["completed"] == n and run["failed"] == 0, run["errors"]
    assert run["total_input_tokens"] == n * prompt_len
    assert run["total_output_tokens"] == n * output_len
    assert run["duration_s"] > 0
    assert run["request_throughput"] == pytest.approx(n / run["duration_s"])
    assert run["output_throughput"] == pytest.approx(n * output_len / run["duration_s"])
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        s = run[key]
        assert 0 < s["mean"] and s["median"] <= s["p99"], (key, s)
    assert run["ttft_ms"]["median"] <= run["e2el_ms"]["median"]
    reqs = run["requests"]
    assert len(reqs) == n
    for r in reqs:
        assert r["ok"] and r["error"] == ""
        assert r["prompt_tokens"] == prompt_len and r["output_tokens"] == output_len
        assert 0 < r["ttft"] <= r["e2el"]
        assert r["tpot"] == pytest.approx((r["e2el"] - r["ttft"]) / (output_len - 1))
        assert len(r["itl"]) <= output_len - 1 and all(x >= 0 for x in r["itl"])
        assert r["ttft"] + sum(r["itl"]) <= r["e2el"] + 1e-6
    assert run["server"]["fenwick_state_slots_total"] == 8


def test_concurrency_sweep_writes_json_and_plots(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    result = run_bench(server_url, out, "--input-len", "24", "--output-len", "6", "--num-prompts", "6",
                       "--max-concurrency", "1", "4", "--num-warmups", "1", "--num-workers", "2")
    assert result["model"] == "tiny" and result["input_len"] == 24 and result["output_len"] == 6
    assert [r["max_concurrency"] for r in result["runs"]] == [1, 4]
    for run in result["runs"]:
        check_run(run, n=6, prompt_len=24, output_len=6)
    # concurrency 1: requests never overlap; concurrency 4 is split over 2 client processes
    assert result["runs"][0]["mean_in_flight"] <= 1.0 + 1e-6
    assert [r["client_processes"] for r in result["runs"]] == [1, 2]
    plots = sorted(Path(p).name for p in result["plots"])
    assert plots == ["latency_cdf.png", "throughput_vs_concurrency.png"]
    for name in plots:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_shared_prefix_poisson(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "prefix"
    result = run_bench(server_url, out, "--dataset", "shared-prefix", "--prefix-len", "16",
                       "--input-len", "8", "--output-len", "4", "--num-prompts", "5", "--request-rate", "20",
                       "--num-warmups", "0")
    (run,) = result["runs"]
    assert run["max_concurrency"] is None and run["request_rate"] == 20
    check_run(run, n=5, prompt_len=24, output_len=4)
    sent = sorted(r["sent_at"] for r in run["requests"])
    assert sent[-1] > sent[0]  # Poisson arrivals are spread out, not all at t = 0
    assert [Path(p).name for p in result["plots"]] == ["latency_cdf.png"]


def test_refuses_non_loopback_targets(tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, str(BENCH), "--base-url", "http://10.0.0.1:8000",
                        "--result-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "not a loopback address" in p.stderr
    assert not (tmp_path / "serve.json").exists()


def test_state_memory_arithmetic(tmp_path: Path) -> None:
    """bench/state_memory.py (run as a script) against the layout's arithmetic and a model's parameters."""
    from fenwick_llm.engine.model import LogLinearMamba2ForCausalLM
    from fenwick_llm.engine.model_config import ModelConfig

    out = tmp_path / "sm.json"
    contexts = ["1", "2", "3", "5", "8", "32768", "32769"]
    p = subprocess.run([sys.executable, str(REPO / "bench" / "state_memory.py"), "--json", str(out),
                        "--contexts", *contexts], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    rows = {r["context"]: r for r in result["rows"]}
    # L(T) = bitlen(T - 1) + 1; live levels after T tokens = popcount(T - 1) + 1
    assert [rows[t]["levels"] for t in (1, 2, 3, 5, 32768, 32769)] == [1, 2, 3, 4, 16, 17]
    assert [rows[t]["live_levels"] for t in (1, 2, 32768, 32769)] == [1, 2, 16, 2]
    assert rows[8]["mean_live_levels"] == pytest.approx(1 + 12 / 8)  # popcounts of 0..7 sum to 12
    row = rows[32768]
    assert row["state_bytes"] == 16 * 24 * 24 * 128 * 64 * 4 and row["kv_bytes"] == 2 * 24 * 32768 * 768 * 2
    fit = (141 * 10**9 - 2 * result["params"]) // (row["state_bytes"] + row["conv_bytes"])
    assert row["fit_h200"] == fit
    config = ModelConfig.from_dict(dict(model_type="log_linear_mamba2", vocab_size=32000, hidden_size=768,
                                        num_hidden_layers=24, head_dim=64, state_size=128,
                                        lambda_mode="linear"))
    model = LogLinearMamba2ForCausalLM(config, device="meta")
    assert result["params"] == sum(p.numel() for p in model.parameters())


def test_multi_turn_reports_turns_and_cache_hits(server_url: str, tmp_path: Path) -> None:
    """--dataset multi-turn: conversations through chat completions; later turns restore earlier ones."""
    out = tmp_path / "multi"
    result = run_bench(server_url, out, "--dataset", "multi-turn", "--num-turns", "3", "--input-len", "12",
                       "--output-len", "4", "--max-concurrency", "2", "--num-conversations", "3",
                       "--num-warmups", "1")
    (run,) = result["runs"]
    assert result["dataset"] == "multi-turn" and run["completed"] == 9 and run["failed"] == 0
    assert [t["turn"] for t in run["turns"]] == [1, 2, 3] and all(t["completed"] == 3 for t in run["turns"])
    assert run["turns"][0]["hit_rate"] == 0 and run["turns"][2]["hit_rate"] > 0.3
    reqs = run["requests"]
    for conv in range(3):
        turns = [r for r in reqs if r["conversation"] == conv]
        assert [r["turn"] for r in turns] == [0, 1, 2] and all(r["output_tokens"] == 4 for r in turns)
        for a, b in zip(turns, turns[1:], strict=False):  # each turn re-sends the last one's prompt and reply
            assert b["prompt_tokens"] > a["prompt_tokens"] + 4 and b["cached_tokens"] >= a["prompt_tokens"]
    assert run["server_counted"]["fenwick_prefix_cache_hits_total"] == run["total_cached_tokens"]
    assert [Path(p).name for p in result["plots"]] == ["ttft_per_turn.png"]


def test_prefix_cache_script_on_the_cpu(tmp_path: Path) -> None:
    """bench/prefix_cache.sh at a tiny scale: two servers (cache on, off), three datasets, the report."""
    model = tmp_path / "model"
    make = [sys.executable, str(REPO / "tools" / "make_random_model.py"), "--hidden", "64", "--layers", "2",
            "--head-dim", "16", "--state-size", "16", "--vocab", "512", "--tokenizer", "word", "--dtype",
            "float32", "--out", str(model)]
    subprocess.run(make, check=True, capture_output=True, timeout=120)
    sizes = dict(TURNS=3, TURN_INPUT=16, TURN_OUTPUT=4, CONVERSATIONS=2, PREFIX=48, PREFIX_SUFFIX=4,
                 PREFIX_OUTPUT=2, PREFIX_REQUESTS=6, PREFIX_CONCURRENCY=2, RANDOM_INPUT=16, RANDOM_OUTPUT=4,
                 RANDOM_PROMPTS=4, RANDOM_CONCURRENCY=2, MAX_MODEL_LEN=512, MAX_NUM_SEQS=4)
    env = {**os.environ, **{k: str(v) for k, v in sizes.items()}, "DEVICE": "cpu", "MODEL_DIR": str(model),
           "OUT": str(tmp_path / "out"), "PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # python3: this interpreter
    p = subprocess.run(["bash", str(REPO / "bench" / "prefix_cache.sh")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(report) == {"multi-turn", "shared", "random"}
    assert report["multi-turn"]["identical_replies"] == report["multi-turn"]["replies"] == 6
    assert report["multi-turn"]["hit_rate"] > 0.3 and report["shared"]["prefilled_share"] < 0.7
    assert "## Multi-turn chat" in (tmp_path / "out" / "report.md").read_text()
