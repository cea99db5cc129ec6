"""Kernel benchmark (H200): prefill throughput and decode bandwidth against their peers.

Prefill: H=32 value heads, G=1, K=128, V=64, bf16, 65,536 tokens per call (B = 65536 / T). Ours,
FLA's ``chunk_log_linear_attn`` and ``chunk_simple_gla``, and PyTorch SDPA (causal, 32 heads of 64).
Decode: N requests at positions in [4096, 16384), achieved bandwidth over the bytes the in-place
Fenwick step must move, against a measured device-to-device copy.

    python bench/kernels.py --out docs/kernels-bench.json        # on the GPU
    python bench/kernels.py --plot docs/kernels-bench.json       # here: table + docs/kernels-bench.png
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch
from fenwick_llm.kernels.state import step_level_blocks

TOKENS = 65536
H, G, K, V = 32, 1, 128, 64
TS = [2048, 4096, 8192, 16384, 32768, 65536]
NS = [1, 8, 32, 64, 256]


def _bench(fn, graph: bool = False) -> float:
    """Median milliseconds (CUDA events through triton.testing)."""
    import triton.testing
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def copy_bandwidth() -> float:
    """GB/s of a large device-to-device copy, counting bytes read plus bytes written."""
    x = torch.randn(1 << 29, device="cuda")  # 2 GiB
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6


def prefill_inputs(T: int, L: int, seed: int = 0):
    B = TOKENS // T
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, T, G, K, device="cuda", generator=gen).bfloat16()
    k = torch.randn(B, T, G, K, device="cuda", generator=gen).bfloat16()
    v = torch.randn(B, T, H, V, device="cuda", generator=gen).bfloat16()
    g = -torch.rand(B, T, H, device="cuda", generator=gen) * 0.1
    lam = (torch.rand(B, T, H, L, device="cuda", generator=gen) + 0.5).bfloat16()
    return q, k, v, g, lam


def _peers():
    try:
        from fla.ops.log_linear_attn import chunk_log_linear_attn as fla_ll
        from fla.ops.simple_gla import chunk_simple_gla
        return fla_ll, chunk_simple_gla
    except Exception as e:  # FLA missing: ours and SDPA only
        print("FLA unavailable:", e)
        return None, None


def prefill_row(T: int, variants: dict) -> dict:
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn_impl
    fla_ll, chunk_simple_gla = _peers()
    L = 15 if T <= 16384 else 17
    q, k, v, g, lam = prefill_inputs(T, L)
    row = {"T": T, "B": TOKENS // T, "L": L}
    for name, kw in variants.items():
        row[f"ours_{name}_ms"] = _bench(lambda kw=kw: chunk_log_linear_attn_impl(q, k, v, g, lam, **kw))
    if fla_ll is not None:
        try:
            row["fla_ll_ms"] = _bench(lambda: fla_ll(q, k, v, g, lam, scale=K ** -0.5))
            if T == TS[0]:
                o_ours = chunk_log_linear_attn_impl(q, k, v, g, lam)[0].float()
                o_fla = fla_ll(q, k, v, g, lam, scale=K ** -0.5)[0].float()
                row["rel_diff_vs_fla"] = ((o_ours - o_fla).norm() / o_fla.norm()).item()
        except Exception as e:
            row["fla_ll_error"] = f"{type(e).__name__}: {e}"[:200]
        if T == 32768:
            try:  # what FLA does with the checkpoints' 15 levels at a length that needs 17
                fla_ll(q, k, v, g, lam[..., :15].contiguous(), scale=K ** -0.5)
                row["fla_ll_L15_at_32K"] = "runs (levels >= 15 get no lambda: masked to 0)"
            except Exception as e:
                row["fla_ll_L15_at_32K"] = f"{type(e).__name__}: {e}"[:200]
        # chunk_simple_gla takes as many q/k heads as value heads (FLA 0.6.0 reads past q/k when G < H)
        qh, kh = (x.expand(-1, -1, H, -1).contiguous() for x in (q, k))
        row["gla_ms"] = _bench(lambda: chunk_simple_gla(qh, kh, v, g, scale=K ** -0.5))
    qs, ks, vs = (torch.randn(TOKENS // T, H, T, 64, device="cuda").bfloat16() for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    row["sdpa_ms"] = _bench(lambda: sdpa(qs, ks, vs, is_causal=True))
    return row


def decode_bytes(positions: list[int], L: int, level_bytes: int, deferred: bool = False) -> int:
    """Bytes the in-place step must move: live levels read, changed levels written, inputs, output.
    deferred (a level_decay pool): only levels 0 and z + 1 are written, plus the [2, L, H] log-decays."""
    total = 0
    for t in positions:
        total += sum(step_level_blocks(t, deferred)) * level_bytes * H
    n = len(positions)
    total += n * (2 * G * K * 2 + H * V * 2 * 2 + H * 4 + H * L * 2 + (2 * L * H * 4 if deferred else 0))
    return total


def bench_decode(rows: list, copy_gbs: float, block_vs: list,
                 state_dtype: torch.dtype = torch.float32, deferred: bool = False) -> None:
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    L = 15
    for N in NS:
        gen = torch.Generator(device="cuda").manual_seed(N)
        P = max(N, 64)
        pool = torch.randn(P, L, H, K, V, device="cuda", generator=gen).to(state_dtype)
        slots = torch.randperm(P, device="cuda", generator=gen)[:N]
        pos = torch.randint(4096, 16384, (N,), device="cuda", generator=gen)
        q = torch.randn(N, G, K, device="cuda").bfloat16()
        k = torch.randn(N, G, K, device="cuda").bfloat16()
        v = torch.randn(N, H, V, device="cuda").bfloat16()
        g = -torch.rand(N, H, device="cuda")
        lam = (torch.rand(N, H, L, device="cuda") + 0.5).bfloat16()
        nbytes = decode_bytes(pos.tolist(), L, K * V * pool.element_size(), deferred)
        row = {"N": N, "state_dtype": str(state_dtype), "deferred": deferred, "bytes": nbytes,
               "copy_GBps": copy_gbs}
        decay = torch.zeros(P, 2, L, H, device="cuda") if deferred else None
        variants = {f"bv{bv}": dict(block_v=bv) for bv in block_vs}
        variants["default"] = {}
        for name, kw in variants.items():
            step = partial(fused_recurrent_step, q, k, v, g, lam, pool, slots, pos, level_decay=decay, **kw)
            ms = _bench(step, graph=True)
            row[f"{name}_us"] = ms * 1e3
            row[f"{name}_GBps"] = nbytes / ms / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)


def main_gpu(out: Path, quick: bool, decode: bool = True, state_dtype: torch.dtype = torch.float32,
             deferred: bool = False) -> None:
    props = torch.cuda.get_device_properties(0)
    meta = {"device": props.name, "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M")}
    import triton
    meta["triton"] = triton.__version__
    copy_gbs = copy_bandwidth()
    meta["copy_GBps"] = copy_gbs
    print(json.dumps(meta), flush=True)
    variants = {"default": {}}
    if quick:
        TS[:] = TS[:1] + TS[-1:]
    prefill, dec = [], []
    if decode:
        bench_decode(dec, copy_gbs, [32, 64], state_dtype, deferred)
        out.write_text(json.dumps({"meta": meta, "prefill": prefill, "decode": dec}, indent=1))
    for T in TS:  # the file is rewritten after every row, so a run cut short keeps what it measured
        prefill.append(prefill_row(T, variants))
        torch.cuda.empty_cache()
        print(json.dumps(prefill[-1]), flush=True)
        out.write_text(json.dumps({"meta": meta, "prefill": prefill, "decode": dec}, indent=1))


def _ours_ms(r: dict) -> float:
    return min(v for key, v in r.items() if key.startswith("ours_") and key.endswith("_ms"))


def table(path: Path) -> str:
    d = json.loads(path.read_text())
    lines = ["| T | B | L | ours (M tok/s) | FLA log-linear | ours / FLA-LL | FLA simple_gla | ours / GLA "
             "| SDPA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in d["prefill"]:
        ours = _ours_ms(r)
        tps = TOKENS / ours / 1e3
        fla = TOKENS / r["fla_ll_ms"] / 1e3 if "fla_ll_ms" in r else None
        gla = TOKENS / r["gla_ms"] / 1e3 if "gla_ms" in r else None
        sdpa = TOKENS / r["sdpa_ms"] / 1e3
        lines.append(f"| {r['T']} | {r['B']} | {r['L']} | {tps:.1f} | "
                     f"{f'{fla:.1f}' if fla else r.get('fla_ll_error', '-')} | "
                     f"{f'{tps / fla:.2f}x' if fla else '-'} | "
                     f"{f'{gla:.1f}' if gla else '-'} | {f'{tps / gla:.2f}x' if gla else '-'} | {sdpa:.1f} |")
    lines += ["", "| N | bytes moved (MB) | step (us) | GB/s | of copy |", "|---|---|---|---|---|"]
    for r in d["decode"]:
        best = min((key for key in r if key.endswith("_us")), key=lambda key: r[key])
        gbs = r[best.replace("_us", "_GBps")]
        lines.append(f"| {r['N']} | {r['bytes'] / 1e6:.1f} | {r[best]:.1f} ({best[:-3]}) | {gbs:.0f} | "
                     f"{gbs / r['copy_GBps']:.0%} |")
    return "\n".join(lines)


def plot(path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = json.loads(path.read_text())
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    Ts = [r["T"] for r in d["prefill"]]

    def series(key_fn):
        return [TOKENS / key_fn(r) / 1e3 if key_fn(r) else float("nan") for r in d["prefill"]]
    a1.plot(Ts, series(_ours_ms), "o-", label="Fenwick chunk (ours)")
    a1.plot(Ts, series(lambda r: r.get("fla_ll_ms")), "s-", label="FLA chunk_log_linear_attn")
    a1.plot(Ts, series(lambda r: r.get("gla_ms")), "^-", label="FLA chunk_simple_gla")
    a1.plot(Ts, series(lambda r: r.get("sdpa_ms")), "x-", label="SDPA causal (FlashAttention)")
    explore = path.with_name("kernels-explore.json")
    if explore.exists():  # the default tiling timed alone: "nodes_bf16" in the first run, "base" since
        rows = json.loads(explore.read_text())
        default = "nodes_bf16" if any(r.get("variant") == "nodes_bf16" for r in rows) else "base"
        pts = [r for r in rows if r.get("variant") == default and "Mtok_s" in r]
        a1.plot([r["T"] for r in pts], [r["Mtok_s"] for r in pts], "o", mfc="none", ms=10,
                label="ours, --explore run (no peers)")
    a1.set_xscale("log", base=2)
    a1.set_yscale("log")
    a1.set_xlabel("T (65,536 tokens per call)")
    a1.set_ylabel("M tokens / s")
    a1.set_title("Prefill, H=32 K=128 V=64 bf16, H200")
    a1.legend(fontsize=8)
    Ns = [r["N"] for r in d["decode"]]
    best = [max(v for key, v in r.items() if key.endswith("_GBps") and key != "copy_GBps")
            for r in d["decode"]]
    a2.bar([str(n) for n in Ns], best, label="fused step")
    a2.axhline(d["meta"]["copy_GBps"], color="k", ls="--", label="device copy")
    a2.axhline(0.6 * d["meta"]["copy_GBps"], color="gray", ls=":", label="60% of copy")
    a2.set_xlabel("N requests (positions 4K-16K)")
    a2.set_ylabel("GB/s")
    a2.set_title("Decode step bandwidth")
    a2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--ts", type=str, help="comma-separated T values (default: all; none: decode only)")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--state-dtype", default="float32", choices=["float32", "bfloat16"], help="decode pool")
    ap.add_argument("--deferred", action="store_true", help="decode pool with deferred decay (level_decay)")
    a = ap.parse_args()
    if a.plot:
        print(table(a.plot))
        plot(a.plot)
    else:
        if a.ts:
            TS[:] = [] if a.ts == "none" else [int(x) for x in a.ts.split(",")]
        main_gpu(a.out or Path("kernels-bench.json"), a.quick, not a.no_decode, getattr(torch, a.state_dtype),
                 a.deferred)
        print(table(a.out or Path("kernels-bench.json")))
