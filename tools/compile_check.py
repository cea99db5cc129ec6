"""Compile the engine's Triton kernels for an NVIDIA GPU on a machine without one.

The interpreter (TRITON_INTERPRET=1) runs a kernel's Python; it does not type-check it as the compiler
does, so a kernel can pass every interpreter test and still fail to compile on the GPU (a variable of
two shapes across a runtime branch, a construct the code generator refuses). This tool runs each
launcher on CPU tensors with Triton's active driver replaced by a stand-in that reports an sm90 target,
and every launch turned into a warm-up (compile, do not launch), with PDL on (kernels/pdl.py, which the
decode kernels must then use): each
kernel goes through the whole pipeline down to a cubin (Triton's bundled ptxas), in the shapes of the
bench model (hidden 768, 24 heads of 64, state 128) and in fp32 and bf16: the decode step's kernels and
the prompt step's (the mixer's prefill inputs, the chunked attention from a pooled state, the window
writer).

    python -m fenwick_llm.tools.compile_check   # one line per launcher; exit status 1 on a failure

It reaches into Triton's runtime (``driver.set_active``, ``JITFunction.run``): a dev tool, not a test.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable

import torch

H, V, K, G, LV, HID, CW, L, P, N = 24, 64, 128, 1, 15, 64, 4, 10, 6, 2  # the bench model; pool of 6 slots
I, D = H * V, H * V + 2 * G * K


class _Sm90Driver:
    """Triton's active driver as far as a warm-up needs it: device 0, stream 0, an sm90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)


def _compile_only() -> list[tuple[str, bool]]:
    """Every Triton launch compiles without launching; returns the (kernel, uses PDL) of each."""
    from fenwick_llm.kernels import pdl
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    driver.set_active(_Sm90Driver())
    pdl.enabled = lambda t: True
    run, seen = JITFunction.run, []

    def warmup(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        seen.append((self.fn.__name__, "griddepcontrol" in kernel.asm["ptx"]))
        return kernel

    JITFunction.run = warmup
    return seen


def _cases(dt: torch.dtype) -> dict[str, Callable[[], object]]:
    from fenwick_llm.kernels import gemv_triton as gemv
    from fenwick_llm.kernels import norm_triton as norm
    from fenwick_llm.kernels.chunk import chunk_log_linear_attn
    from fenwick_llm.kernels.fused_recurrent import fused_recurrent_step
    from fenwick_llm.kernels.mixer_triton import mixer_decode_inputs_triton, mixer_prefill_inputs_triton
    from fenwick_llm.kernels.state import PooledState, window_rows
    from fenwick_llm.kernels.window_triton import window_step, write_window_triton

    r = lambda *s, dtype=dt: torch.randn(*s).to(dtype)  # noqa: E731
    proj, conv_pool = r(N, I + D + H + H * LV), r(P, D, CW - 1)
    slots, pos = torch.tensor([1, 3]), torch.tensor([100, 37])
    window = (r(P, 2, 32, G, K), r(P, 2, 32, H, V), r(P, 2, 32, H, dtype=torch.float32))
    decay, q, v, h = torch.zeros(P, 2, L, H), r(N, G, K), r(N, H, V), r(N, 768)
    shape = dict(intermediate_size=I, n_groups=G, state_size=K, num_heads=H, head_dim=V, lambda_levels=LV)
    mlp = dict(fc1_w=torch.randn(HID, LV), fc1_b=torch.randn(HID), fc2_w=torch.randn(LV, HID),
               fc2_b=torch.randn(LV))
    lam = {"mlp": mlp, "linear": dict(lambda_L=torch.randn(H, LV)), "none": {}}
    cases = {
        f"mixer decode {mode}": (lambda mode=mode: mixer_decode_inputs_triton(
            proj, conv_pool, slots, r(D, CW), r(D), torch.randn(H), torch.randn(H), lambda_mode=mode,
            **shape, **lam[mode]))
        for mode in lam
    }
    cases.update({  # the prefill's conv and heads kernels share the decode kernel's helpers
        f"mixer prefill {mode}": (lambda mode=mode: mixer_prefill_inputs_triton(
            r(70, I + D + H + H * LV), torch.tensor([0, 30, 70]), conv_pool, slots, r(D, CW), r(D),
            torch.randn(H), torch.randn(H), lambda_mode=mode, **shape, **lam[mode]))
        for mode in lam
    })
    T, lens = 70, [30, 40]
    pooled = PooledState(torch.zeros(P, L - 6, H, K, V), decay, slots, pos, window)
    cases.update({  # the prompt step: the chunked attention from the pool, into the pool, and the windows
        "chunk prefill": lambda: chunk_log_linear_attn(
            r(1, T, G, K), r(1, T, G, K), r(1, T, H, V), -torch.rand(1, T, H), torch.rand(1, T, H, L),
            initial_state=pooled, cu_seqlens=torch.tensor([0, *lens]).cumsum(0),
            final_into=(torch.zeros(P, L - 6, H, K, V), slots)),
        "chunk prefill with folds": lambda: chunk_log_linear_attn(  # 18 chunks: nodes of 16 fold
            r(1, 1100, G, K), r(1, 1100, G, K), r(1, 1100, H, V), -torch.rand(1, 1100, H),
            torch.rand(1, 1100, H, 12), output_final_state=True),
        "write_window prefill": lambda: write_window_triton(window, window_rows([100, 37], lens, slots),
                                                            r(T, G, K), r(T, H, V), torch.randn(T, H)),
    })
    cases.update({
        "window_step": lambda: window_step(q, q, v, torch.randn(N, H), torch.rand(N, H, L),
                                           torch.zeros(P, L - 6, H, K, V), decay, window, slots, pos),
        "fused_recurrent_step": lambda: fused_recurrent_step(q, q, v, torch.randn(N, H), torch.rand(N, H, L),
                                                             torch.zeros(P, L, H, K, V), slots, pos,
                                                             level_decay=decay),
        "gated_rmsnorm": lambda: norm.gated_rmsnorm_triton(torch.randn(N, H, V), r(N, H, V), torch.randn(H),
                                                           r(N, I), torch.randn(I), 1e-5, I, False, dt),
        "add_rmsnorm": lambda: norm.add_rmsnorm_triton(h, h, torch.randn(768), 1e-5),
        "gemv rmsnorm_linear": lambda: gemv.rmsnorm_linear_triton(h, torch.randn(768), 1e-5, r(3000, 768)),
        "gemv rmsnorm_linear_silu_mul": lambda: gemv.rmsnorm_linear_silu_mul_triton(h, torch.randn(768), 1e-5,
                                                                                     r(4096, 768)),
        "gemv linear_residual": lambda: gemv.linear_residual_triton(r(N, I), r(768, I), h),
        # one row: the weight slices preloaded before the PDL wait (gemv.default_config)
        "gemv rmsnorm_linear 1 row": lambda: gemv.rmsnorm_linear_triton(h[:1], torch.randn(768), 1e-5,
                                                                        r(3000, 768)),
        "gemv rmsnorm_linear_silu_mul 1 row": lambda: gemv.rmsnorm_linear_silu_mul_triton(
            h[:1], torch.randn(768), 1e-5, r(4096, 768)),
        "gemv linear_residual 1 row": lambda: gemv.linear_residual_triton(r(1, I), r(768, I), h[:1]),
        "gemv linear_residual 1 row K 2048": lambda: gemv.linear_residual_triton(r(1, 2048), r(768, 2048),
                                                                                 h[:1]),
    })
    return cases


def main() -> int:
    seen = _compile_only()
    failed = 0
    for dt in (torch.float32, torch.bfloat16):
        for name, case in _cases(dt).items():
            before = len(seen)
            try:
                case()
            except Exception as exc:  # noqa: BLE001  (report every launcher, then fail)
                failed += 1
                print(f"FAIL {name} {dt}: {type(exc).__name__}: {exc}"[:3000])
                traceback.print_exc(limit=2)
                continue
            pdl_ok = all(uses for _, uses in seen[before:]) or "prefill" in name  # PDL: decode kernels
            kernels = ", ".join(k for k, _ in seen[before:])
            print(f"ok   {name} {dt}: {kernels}" + ("" if pdl_ok else " (no PDL in a decode kernel)"))
            failed += not pdl_ok
    print(f"{len(seen)} kernels compiled for sm90, {failed} failures")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
