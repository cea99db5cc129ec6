"""Fused small-M GEMV kernels (kernels/gemv_triton.py) against the unfused torch sequence, on the GPU.

For the dense layers of a 768-hidden model at M = 1, 2, 4, 8 rows: the fused Triton launch, the
reference (the model's own torch ops: RMSNorm's elementwise kernels + cuBLAS + SiLU-mul / residual add)
and the bare cuBLAS GEMM, each timed inside a CUDA graph (triton.testing.do_bench_cudagraph, median).
The captured calls cycle through enough copies of the weights (>= 256 MiB) that they come from HBM, as
in a decode step of a real model, not from the 60 MiB L2 (``--hot`` turns that off). The Triton output
is checked against the reference on the same inputs (largest per-row relative error, largest ulp
distance; float32 1e-5, bf16 / fp16 1e-2). ``--sweep`` also times a grid of launch configs per
(op, M) and prints the best next to the default.

    python bench/gemv.py                    # table
    python bench/gemv.py --sweep --ops down # tune one op
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from fenwick_llm.kernels import gemv_torch
from fenwick_llm.kernels import gemv_triton as gemv

HIDDEN = 768
SHAPES = {  # op name: (function, K, N; for gate_up N is I and the weight has 2 * I rows)
    "in_proj": ("rmsnorm_linear", HIDDEN, 3712),
    "out_proj": ("linear_residual", 1536, HIDDEN),
    "gate_up": ("rmsnorm_linear_silu_mul", HIDDEN, 2048),
    "down": ("linear_residual", 2048, HIDDEN),
    "lm_head": ("rmsnorm_linear", HIDDEN, 32000),
}
ROTATE_BYTES = 256 << 20
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def _us(fn: Callable[[], object]) -> float:
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median")


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    bits = torch.finfo(a.dtype).bits
    as_int = {16: torch.int16, 32: torch.int32}[bits]

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.view(as_int).long()
        return torch.where(i >= 0, i, -(i + (1 << (bits - 1))))

    return int((ordered(a) - ordered(b)).abs().max())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()


class Case:
    """Inputs of one op at M rows, with ``copies`` copies of its weight to cycle through."""

    def __init__(self, op: str, M: int, dtype: torch.dtype, hot: bool, seed: int = 0) -> None:
        self.fn_name, self.K, self.N = SHAPES[op]
        gen = torch.Generator(device="cuda").manual_seed(seed)
        K, rows = self.K, self.N * (2 if self.fn_name == "rmsnorm_linear_silu_mul" else 1)
        self.weight_bytes = rows * K * torch.finfo(dtype).bits // 8
        copies = 1 if hot else max(2, math.ceil(ROTATE_BYTES / self.weight_bytes))
        w = torch.randn(rows, K, device="cuda", generator=gen) / math.sqrt(K)
        self.weights = [w.to(dtype) for _ in range(copies)]
        self.x = (3 * torch.randn(M, K, device="cuda", generator=gen)).to(dtype)
        self.norm_weight = 1 + 0.2 * torch.randn(K, device="cuda", generator=gen)
        self.residual = (4 * torch.randn(M, self.N, device="cuda", generator=gen)).to(dtype)

    def args(self, w: torch.Tensor) -> tuple:
        if self.fn_name == "linear_residual":
            return self.x, w, self.residual
        return self.x, self.norm_weight, 1e-5, w

    def cycling(self, call: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
        ws = itertools.cycle(self.weights)
        return lambda: call(*self.args(next(ws)))

    def fused(self, config: gemv.GemvConfig | None = None) -> Callable[[], torch.Tensor]:
        fn = getattr(gemv, f"{self.fn_name}_triton")
        return self.cycling(lambda *a: fn(*a, config=config))

    def unfused(self) -> Callable[[], torch.Tensor]:
        return self.cycling(getattr(gemv_torch, f"{self.fn_name}_ref"))

    def gemm_only(self) -> Callable[[], torch.Tensor]:
        ws = itertools.cycle(self.weights)
        return lambda: F.linear(self.x, next(ws))


def _configs(M: int, silu: bool) -> list[gemv.GemvConfig]:
    m_pad = 1 << (M - 1).bit_length()
    grid = itertools.product((4, 8, 16), (64, 128, 256, 512), (2, 3, 4, 6, 8))
    return [gemv.GemvConfig(bn, bk, st) for bn, bk, st in grid
            if m_pad * bn * bk * (2 if silu else 1) <= 2 * gemv.ACC_ELEMS]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--ms", default="1,2,4,8", help="row counts, comma-separated")
    p.add_argument("--ops", default=",".join(SHAPES), help=f"subset of {','.join(SHAPES)}")
    p.add_argument("--hot", action="store_true", help="one weight copy (L2-resident after the first call)")
    p.add_argument("--sweep", action="store_true", help="also search launch configs per (op, M)")
    a = p.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[a.dtype]
    Ms = [int(m) for m in a.ms.split(",")]
    print(f"{torch.cuda.get_device_name()}  dtype={a.dtype}  weights {'L2-hot' if a.hot else 'from HBM'}")
    head = (f"{'op':9s} {'M':>2s} {'K':>5s} {'N':>6s} | {'torch':>7s} {'cuBLAS':>7s} {'fused':>7s} us | "
            f"{'speedup':>7s} {'GB/s':>6s} | {'rel err':>8s} {'ulps':>4s} {'ok':>4s}")
    print(head + "\n" + "-" * len(head))
    failed = False
    layer = {M: [0.0, 0.0] for M in Ms}  # M: [torch, fused] us of the four dense ops of a layer
    for op in a.ops.split(","):
        for M in Ms:
            c = Case(op, M, dtype, a.hot)
            got, want = c.fused()(), c.unfused()()
            rel, ulps = _rel(got, want), _ulps(got, want)
            ok = rel < TOL[dtype] and torch.isfinite(got).all().item()
            failed |= not ok
            t_ref, t_mm, t_fused = _us(c.unfused()), _us(c.gemm_only()), _us(c.fused())
            if op != "lm_head":
                layer[M][0] += t_ref
                layer[M][1] += t_fused
            print(f"{op:9s} {M:2d} {c.K:5d} {c.N:6d} | {t_ref:7.2f} {t_mm:7.2f} {t_fused:7.2f}    | "
                  f"{t_ref / t_fused:6.2f}x {c.weight_bytes / t_fused / 1e3:6.0f} | {rel:8.1e} {ulps:4d} "
                  f"{'ok' if ok else 'FAIL':>4s}")
            if a.sweep:
                t_best, best = min(((_us(c.fused(cfg)), cfg) for cfg in _configs(M, op == "gate_up")),
                                   key=lambda tc: tc[0])
                default = gemv.default_config(M, c.K, dtype.itemsize, c.fn_name != "linear_residual",
                                              op == "gate_up")
                print(f"{'':9s} sweep: best {t_best:.2f} us at {best}; default {default}")
            del c
    if all(op in a.ops.split(",") for op in ("in_proj", "out_proj", "gate_up", "down")):
        print("\ndense part of a layer (in_proj + out_proj + gate_up + down, sum of the rows above):")
        for M, (t_ref, t_fused) in layer.items():
            print(f"  M={M}: torch {t_ref:.2f} us, fused {t_fused:.2f} us ({t_ref / t_fused:.2f}x)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
