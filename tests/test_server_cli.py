"""`fenwick serve`'s command line: configuration is built here, once, and frozen."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fenwick_llm.server import cli
from fenwick_llm.server.config import ServerConfig, sampling_defaults_from_generation_config
from server_utils import REPO


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_missing_demo_model_says_what_to_pass(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(cli, "DEMO_MODEL", tmp_path / "fenwick-shakespeare")
    with pytest.raises(SystemExit, match="Pass --model DIR"):
        cli.resolve_model_dir(None)
    with pytest.raises(SystemExit, match="not a model directory"):
        cli.resolve_model_dir(tmp_path)


def test_python_dash_m_fails_fast_on_a_wrong_path() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "fenwick_llm.server", "serve", "--model", "/no/such/model"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode != 0 and "pass --model DIR" in r.stderr


def test_build_configs(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = tmp_path / "my-model"
    shutil.copytree(tiny_model_dir, model)
    (model / "generation_config.json").write_text(
        json.dumps({"temperature": 0.7, "top_k": 40, "eos_token_id": 0})
    )
    args = cli.build_parser().parse_args(
        [
            "serve",
            "--model",
            str(model),
            "--max-num-seqs",
            "3",
            "--max-model-len",
            "128",
            "--api-key",
            "k",
            "--device",
            "cpu",
            "--port",
            "9123",
            "--state-dtype",
            "bfloat16",
            "--max-num-batched-tokens",
            "256",
            "--memory-fraction",
            "0.5",
            "--seed",
            "7",
            "--enforce-eager",
            "--no-overlap-decode",
            "--cpu-threads",
            "3",
        ]
    )
    engine_config, server_config = cli.build_configs(args)
    assert engine_config.max_num_seqs == 3 and engine_config.max_model_len == 128
    assert engine_config.state_dtype == "bfloat16" and engine_config.max_num_batched_tokens == 256
    assert engine_config.memory_fraction == 0.5 and engine_config.seed == 7
    assert engine_config.enforce_eager and engine_config.cpu_threads == 3
    assert engine_config.overlap_decode is False and not engine_config.use_overlap_decode
    assert engine_config.prefill_graph_max_tokens == 256  # prompt graphs up to the step budget
    assert engine_config.served_model_name == server_config.served_model_name == "my-model"
    assert server_config.api_key == "k" and server_config.port == 9123
    assert dict(server_config.sampling_defaults) == {"temperature": 0.7, "top_k": 40}
    with pytest.raises(dataclasses.FrozenInstanceError):
        server_config.port = 1  # type: ignore[misc]
    defaults, _ = cli.build_configs(cli.build_parser().parse_args(["serve", "--model", str(model)]))
    assert defaults.state_dtype == "float32" and not defaults.enforce_eager
    assert defaults.overlap_decode is None and defaults.cpu_threads is None
    assert defaults.prefill_graph_max_tokens == defaults.max_num_batched_tokens
    too_long = cli.build_parser().parse_args(
        ["serve", "--model", str(model), "--max-model-len", str(1 << 30)]
    )
    with pytest.raises(ValueError, match="max_model_len"):
        cli.build_configs(too_long)
    no_threads = cli.build_parser().parse_args(["serve", "--model", str(model), "--cpu-threads", "0"])
    with pytest.raises(ValueError, match="cpu_threads"):
        cli.build_configs(no_threads)


def test_server_config_validation() -> None:
    assert sampling_defaults_from_generation_config({"do_sample": False, "temperature": 0.9}) == {
        "temperature": 0.0
    }
    for bad in ({"port": 70000}, {"api_key": ""}, {"max_body_bytes": 10}, {"sampling_defaults": {"foo": 1}}):
        with pytest.raises(ValueError):
            ServerConfig(**bad)  # type: ignore[arg-type]


def test_demo_model_is_the_default() -> None:
    assert cli.resolve_model_dir(None) == cli.DEMO_MODEL.resolve()
