"""Running Triton kernels on the CPU under TRITON_INTERPRET=1, for the kernel test modules.

A module's interpreter cases run in a subprocess (the module itself run as a script, printing one
JSON line of results), so the interpreter's setting never leaks into the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parent


DT_ID = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # test ids of dtypes


def run_interpreted(script: str, timeout: float = 600) -> dict:
    """Run ``script`` with the interpreter on; its last stdout line, parsed as JSON."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, script], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_bf16_to_nearest_even() -> None:
    """Make the interpreter's float32 -> bfloat16 cast round to nearest even, as on the GPU."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    truncating = interpreter.InterpreterBuilder.cast_impl

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            u = src.data.view(np.uint32)
            bits = ((u + np.uint32(0x7FFF) + ((u >> 16) & 1)) >> 16).astype(np.uint16)
            bits = np.where(np.isnan(src.data), np.uint16(0x7FC0), bits)
            return interpreter.TensorHandle(bits, tl.bfloat16)
        return truncating(self, src, dst_type)

    interpreter.InterpreterBuilder.cast_impl = cast_impl


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between a and b in units in the last place of their (common) dtype."""
    bits = torch.finfo(a.dtype).bits
    as_int = {16: torch.int16, 32: torch.int32}[bits]

    def ordered(x: torch.Tensor) -> torch.Tensor:  # sign-magnitude bits -> integers in value order
        i = x.view(as_int).long()
        return torch.where(i >= 0, i, -(i + (1 << (bits - 1))))

    return int((ordered(a) - ordered(b)).abs().max()) if a.numel() else 0
