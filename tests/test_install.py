"""The package installs under one import root beside the ML stack (issue: HF's `kernels` package, which
transformers imports, is a top-level `kernels`, as our kernels/ folder was).

Each check runs in a fresh interpreter started outside the checkout, so that only what is installed
is importable, as for a user."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(code: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_transformers_and_fenwick_llm_share_a_process(tmp_path: Path) -> None:
    """transformers' activations import Hugging Face's `kernels`; ours is fenwick_llm.kernels."""
    out = _run("""
import transformers.activations
import kernels as hf_kernels
import fenwick_llm
from fenwick_llm import LLM, SamplingParams, kernels
assert hf_kernels.__name__ == "kernels" and kernels.__name__ == "fenwick_llm.kernels"
assert "site-packages" in hf_kernels.__file__, hf_kernels.__file__
assert kernels.FenwickState is not None and callable(kernels.chunk_log_linear_attn)
print(transformers.__version__)
""", tmp_path)
    assert out.strip()


def test_nothing_installs_a_bare_engine_kernels_or_server(tmp_path: Path) -> None:
    out = _run("""
import importlib.util
for name in ("engine", "server", "tools", "models"):
    assert importlib.util.find_spec(name) is None, name
spec = importlib.util.find_spec("kernels")
print(spec.origin if spec else None)
""", tmp_path)
    origin = out.strip()  # `kernels`, if any, is Hugging Face's (a venv may sit beside the checkout)
    assert origin == "None" or not Path(origin).resolve().is_relative_to(REPO.resolve()), origin


def test_the_demo_model_is_found_as_installed(tmp_path: Path) -> None:
    out = _run("""
from fenwick_llm.models import demo_model_dir
from fenwick_llm.server.cli import resolve_model_dir
d = demo_model_dir()
assert all((d / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))
assert resolve_model_dir(None) == d.resolve()
print(d)
""", tmp_path)
    assert out.strip().endswith("fenwick-shakespeare")


@pytest.mark.slow
def test_the_wheel_holds_one_import_root_and_the_demo_model(tmp_path: Path) -> None:
    """What `pip install .` installs: fenwick_llm/ with the demo model inside, no other top-level."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("fenwick_llm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"fenwick_llm"}, tops
    for path in ("fenwick_llm/engine/llm.py", "fenwick_llm/kernels/chunk.py", "fenwick_llm/server/cli.py",
                 "fenwick_llm/models/fenwick-shakespeare/model.safetensors",
                 "fenwick_llm/models/fenwick-shakespeare/tokenizer_config.json"):
        assert path in names, path
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "fenwick = fenwick_llm.server.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
