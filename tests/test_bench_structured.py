"""bench/structured.py at tiny scale on CPU: compile, masks and the HTTP comparison, as one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from server_utils import free_port

BENCH = Path(__file__).resolve().parent.parent / "bench" / "structured.py"


def test_bench_structured_runs_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "structured.json"
    cmd = [sys.executable, str(BENCH), "--model", str(tiny_model_dir), "--device", "cpu",
           "--batches", "1", "4", "--mask-steps", "4", "--concurrency", "2", "--num-prompts", "4",
           "--output-len", "8", "--rounds", "1", "--port", str(free_port()), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["compile"]["schemas"] >= 50 and result["compile"]["compile_ms_p99"] > 0
    assert set(result["masks"]) == {"1", "4"} and all(m["steps"] == 4 for m in result["masks"].values())
    http = result["http"]
    assert all(r["failed"] == 0 and r["output_tokens"] == 4 * 8 for v in http["runs"].values() for r in v)
    assert http["ratio"] > 0 and http["grammar_compiles"]
