"""kernels.apply_token_bitmask_: the PyTorch reference against a per-token loop, and the Triton kernel
against the reference under the interpreter (run as a script in a subprocess) and on the GPU."""

from __future__ import annotations

import json

import pytest
import torch
from fenwick_llm.kernels.bitmask_torch import apply_token_bitmask_ref
from interpreted import DT_ID, run_interpreted

from fenwick_llm import kernels

# (logits rows N, vocab V, masked rows): V not a multiple of 32, nor of the Triton block
CASES = {"n5-v100": (5, 100, [4, 0, 2]), "n3-v4099": (3, 4099, [1]), "n1-v32": (1, 32, [0]),
         "none": (4, 64, [])}


def _inputs(n: int, vocab: int, rows: list[int], dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen).to(dtype)
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31, (len(rows), words), generator=gen, dtype=torch.int64)
    return logits, bitmask.to(torch.int32), torch.tensor(rows, dtype=torch.long)


def _loop(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    out = logits.clone()
    for r, row in enumerate(rows.tolist()):
        for v in range(logits.shape[1]):
            if not (int(bitmask[r, v // 32]) >> (v % 32)) & 1:
                out[row, v] = float("-inf")
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_reference_is_the_bit_layout(case: str) -> None:
    logits, bitmask, rows = _inputs(*CASES[case], torch.float32)
    want = _loop(logits, bitmask, rows)
    apply_token_bitmask_ref(logits, bitmask, rows)
    assert torch.equal(logits, want)


def test_dispatcher_on_cpu_takes_the_reference() -> None:
    logits, bitmask, rows = _inputs(5, 100, [1, 3], torch.float32)
    want = logits.clone()
    apply_token_bitmask_ref(want, bitmask, rows)
    kernels.apply_token_bitmask_(logits, bitmask, rows)
    assert torch.equal(logits, want)


def _interpret_cases() -> dict:
    from fenwick_llm.kernels.bitmask_triton import apply_token_bitmask_triton

    res = {}
    for name, (n, vocab, rows) in CASES.items():
        for dtype in (torch.float32, torch.bfloat16):
            logits, bitmask, rows_t = _inputs(n, vocab, rows, dtype)
            want = logits.clone()
            apply_token_bitmask_ref(want, bitmask, rows_t)
            apply_token_bitmask_triton(logits, bitmask, rows_t)
            res[f"{name}-{DT_ID[dtype]}"] = bool(torch.equal(logits, want))
    return res


@pytest.fixture(scope="module")
def interpret_results() -> dict:
    return run_interpreted(__file__, timeout=300)


@pytest.mark.parametrize("case", [f"{c}-{d}" for c in CASES for d in ("fp32", "bf16")])
def test_triton_interpreted(interpret_results: dict, case: str) -> None:
    assert interpret_results[case]


@pytest.mark.gpu
def test_gpu_kernel_matches_reference() -> None:
    logits, bitmask, rows = _inputs(256, 128_256, list(range(0, 256, 3)), torch.bfloat16)
    want = logits.clone()
    apply_token_bitmask_ref(want, bitmask, rows)
    got = logits.cuda()
    kernels.apply_token_bitmask_(got, bitmask.cuda(), rows.cuda())
    assert torch.equal(got.cpu(), want)


if __name__ == "__main__":
    print(json.dumps(_interpret_cases()))
