"""Dense layers of a decode step in Triton for a few rows (M <= 8), with the norm and the epilogue fused in.

At batch 1..8 a decode step is bound by launches and latency, not by FLOPs: each small cuBLAS GEMM
takes several microseconds and every norm, activation and residual add is a kernel of its own. Here
the dense part of a layer is four launches:

    rmsnorm_linear           mixer_norm + in_proj                     (and norm_f + lm_head)
    linear_residual          out_proj + the residual add
    rmsnorm_linear_silu_mul  mlp_norm + [gate_proj; up_proj] + silu(gate) * up
    linear_residual          down_proj + the residual add

Each op has a PyTorch reference in ``gemv_torch.py`` (the specification and the CPU path, bit-identical
to the model's modules) and a Triton form here with the same signature; the package's dispatcher runs
Triton on CUDA tensors with 1 <= M <= MAX_ROWS and the reference otherwise. Weights are ``nn.Linear.weight``
([N_out, K], contiguous, model dtype) and there are no biases: callers check that the Linear has none.

The Triton kernel is a GEMV over blocks of BN output columns (weight rows): each program streams its
[BN, K] slice of the weight in [BN, BK] tiles against the [M, BK] input rows, a broadcast multiply into
a float32 [M_PAD, BN, BK] accumulator that is reduced over BK once at the end (no tl.dot: M is tiny;
no per-step shuffles). The K loop is software-pipelined (``num_stages`` cp.async stages) so that each
program keeps ~24 KiB of loads in flight. At one row the whole [BN, K] slice fits in registers
(``preload``, BN narrowed to as few as PRELOAD_MIN_BN rows where K is wide): the program loads it before
its PDL wait, so that only the input is read after the previous kernel has finished, and the product is
one broadcast multiply and one reduction. The RMSNorm prologue first sums each input row's squares in
one pass for K <= 8192 / M_PAD (the rows are small and stay in L1/L2), then the main loop normalises the
input on the fly and rounds it to the model dtype exactly where the reference rounds, so that the only
differences left are the order of the float32 sums and rsqrt's last bit. SiLU-mul programs own
matching columns of the gate and up halves, so the epilogue is local. The kernels allocate nothing but
their output and never synchronise with the host, so a decode step built from them can be captured in
a CUDA graph (compile them with one eager call first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import pdl
from .ops import unit_last
from .triton_utils import prefetch_l2, wait_then_release

MAX_ROWS = 8  # the Triton path takes 1 <= M <= MAX_ROWS rows; more go to cuBLAS through the reference

BLOCK_N = 8  # output rows per program: N_out = 768 -> 96 programs

ACC_ELEMS = 8192  # M_PAD * BN * BK (x2 for gate/up): 64 float32 accumulator registers a thread at 4 warps

NORM_ELEMS = 8192  # M_PAD * BK of the RMSNorm prologue's tile: K <= 1024 is one pass even at M = 8

IN_FLIGHT_BYTES = 24 << 10  # weight + input bytes a program keeps in flight through the pipeline's stages

NUM_WARPS = 4

PRELOAD_ELEMS = 4096  # M_PAD * BN * next_pow2(K) (x2 for gate/up) up to which the slice is preloaded

PRELOAD_MIN_BN = 2  # the preloading program narrows BN down to this to fit PRELOAD_ELEMS

PRELOAD_THREAD_ELEMS = 16  # products a thread of a preloading program holds: fewer warps for narrow tiles


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the Triton kernel (``default_config`` picks one; benchmarks override it)."""

    block_n: int  # BN: output columns (weight rows) per program, a power of 2
    block_k: int  # BK: reduction chunk per step of the K loop, a power of 2
    num_stages: int  # software pipeline depth of the K loop (cp.async stages on sm80+)
    preload: bool = False  # the whole [BN, K] weight slice in registers, loaded before the PDL wait
    num_warps: int = NUM_WARPS


@triton.jit
def _gemv_kernel(x, norm_weight, weight, residual, out, M, N, s_xm, s_rm, s_om, eps,
                 K: tl.constexpr, M_PAD: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 BK_NORM: tl.constexpr, NUM_STAGES: tl.constexpr, PRELOAD: tl.constexpr, BKP: tl.constexpr,
                 HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SILU_MUL: tl.constexpr,
                 USE_PDL: tl.constexpr, NL: tl.constexpr, LINE: tl.constexpr):
    """USE_PDL (kernels.pdl): wait for the previous kernel before reading anything it may have written
    (x, the residual). Before the wait, PRELOAD: load this program's weight rows whole ([BN, BKP], BKP =
    next_pow2(K)); otherwise ask L2 for them, NL lines of LINE elements."""
    i_n = tl.program_id(0)
    o_m = tl.arange(0, M_PAD)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = (o_m < M)[:, None, None]  # (M_PAD, 1, 1)
    m_n = (o_n < N)[None, :, None]  # (1, BN, 1)
    p_x = x + o_m[:, None, None] * s_xm  # (M_PAD, 1, 1) row starts
    p_w = weight + o_n[None, :, None].to(tl.int64) * K  # (1, BN, 1) row starts
    if SILU_MUL:
        p_wu = weight + (N + o_n)[None, :, None].to(tl.int64) * K  # up_proj rows of the same outputs
    if PRELOAD:  # the weight rows are constants: in registers while the previous kernel drains
        o_kp = tl.arange(0, BKP)[None, None, :]  # (1, 1, BKP)
        m_kp = o_kp < K
        b_wp = tl.load(p_w + o_kp, mask=m_n & m_kp, other=0.0)  # (1, BN, BKP)
        if SILU_MUL:
            b_wup = tl.load(p_wu + o_kp, mask=m_n & m_kp, other=0.0)
        if HAS_NORM:
            b_nwp = tl.load(norm_weight + o_kp, mask=m_kp, other=0.0).to(tl.float32)
    if USE_PDL and not PRELOAD:  # fetch the weight rows into L2 while the previous kernel drains
        o_l = tl.minimum(i_n * BN * K + tl.arange(0, NL) * LINE, N * K - 1)
        prefetch_l2(weight + o_l)
        if SILU_MUL:
            prefetch_l2(weight + N * K + o_l)
    wait_then_release(USE_PDL)
    m_y = (o_m < M)[:, None] & (o_n < N)[None, :]  # (M_PAD, BN)
    if HAS_RESIDUAL:  # loaded before the K loop so that its latency hides behind the weights'
        b_res = tl.load(residual + o_m[:, None] * s_rm + o_n[None, :], mask=m_y, other=0.0).to(tl.float32)
    if PRELOAD:
        b_x = tl.load(p_x + o_kp, mask=m_m & m_kp, other=0.0).to(tl.float32)  # (M_PAD, 1, BKP)
        if HAS_NORM:
            b_r = tl.rsqrt(tl.sum(b_x * b_x, axis=2) / K + eps)[:, :, None]  # (M_PAD, 1, 1)
            b_x = (b_x * b_r * b_nwp).to(x.dtype.element_ty).to(tl.float32)  # rounded as the reference
        b_acc = b_x * b_wp.to(tl.float32)  # (M_PAD, BN, BKP)
        if SILU_MUL:
            b_acc_up = b_x * b_wup.to(tl.float32)
    else:
        if HAS_NORM:
            b_ss = tl.zeros([M_PAD], dtype=tl.float32)
            for i_k in range(tl.cdiv(K, BK_NORM)):
                o_k = i_k * BK_NORM + tl.arange(0, BK_NORM)
                m_x = (o_m < M)[:, None] & (o_k < K)[None, :]
                b_x = tl.load(x + o_m[:, None] * s_xm + o_k[None, :], mask=m_x, other=0.0).to(tl.float32)
                b_ss += tl.sum(b_x * b_x, axis=1)
            b_r = tl.rsqrt(b_ss / K + eps)[:, None, None]  # (M_PAD, 1, 1)
        b_acc = tl.zeros([M_PAD, BN, BK], dtype=tl.float32)
        if SILU_MUL:
            b_acc_up = tl.zeros([M_PAD, BN, BK], dtype=tl.float32)
        for i_k in tl.range(tl.cdiv(K, BK), num_stages=NUM_STAGES):
            o_k = (i_k * BK + tl.arange(0, BK))[None, None, :]  # (1, 1, BK)
            m_k = o_k < K
            b_x = tl.load(p_x + o_k, mask=m_m & m_k, other=0.0).to(tl.float32)  # (M_PAD, 1, BK)
            if HAS_NORM:
                b_nw = tl.load(norm_weight + o_k, mask=m_k, other=0.0).to(tl.float32)
                b_x = (b_x * b_r * b_nw).to(x.dtype.element_ty).to(tl.float32)  # rounded as the reference
            b_w = tl.load(p_w + o_k, mask=m_n & m_k, other=0.0).to(tl.float32)  # (1, BN, BK)
            b_acc += b_x * b_w
            if SILU_MUL:
                b_wu = tl.load(p_wu + o_k, mask=m_n & m_k, other=0.0).to(tl.float32)
                b_acc_up += b_x * b_wu
    b_y = tl.sum(b_acc, axis=2).to(out.dtype.element_ty).to(tl.float32)  # (M_PAD, BN) the Linear output
    if SILU_MUL:
        b_u = tl.sum(b_acc_up, axis=2).to(out.dtype.element_ty).to(tl.float32)
        b_y = b_y / (1.0 + tl.exp(-b_y)) * b_u
    if HAS_RESIDUAL:
        b_y += b_res
    tl.store(out + o_m[:, None] * s_om + o_n[None, :], b_y.to(out.dtype.element_ty), mask=m_y)


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def default_config(M: int, K: int, itemsize: int, has_norm: bool, silu_mul: bool) -> GemvConfig:
    """Preloaded where a slice of at least PRELOAD_MIN_BN rows fits PRELOAD_ELEMS (one row): BN the widest
    power of 2 up to BLOCK_N that fits. Otherwise BN = BLOCK_N; BK as wide as the accumulator budget
    allows, within [32, 512], and enough stages to keep about IN_FLIGHT_BYTES of weights and inputs loading
    (at least 2, at most 8, no more than the loop has)."""
    m_pad, n_w = _pow2(M), 2 if silu_mul else 1
    bn = BLOCK_N
    while bn > PRELOAD_MIN_BN and m_pad * bn * _pow2(K) * n_w > PRELOAD_ELEMS:
        bn //= 2
    tile = m_pad * bn * _pow2(K) * n_w
    if tile <= PRELOAD_ELEMS:
        return GemvConfig(bn, 32, 1, preload=True,
                          num_warps=max(1, min(NUM_WARPS, tile // (32 * PRELOAD_THREAD_ELEMS))))
    bk = max(32, min(512, ACC_ELEMS // (m_pad * BLOCK_N * n_w), _pow2(K)))
    stage = (n_w * BLOCK_N + m_pad) * bk * itemsize + (4 * bk if has_norm else 0)
    stages = max(2, min(8, 1 + round(IN_FLIGHT_BYTES / stage), 1 + -(-K // bk)))
    return GemvConfig(BLOCK_N, bk, stages)


def _gemv(x: torch.Tensor, weight: torch.Tensor, N: int, norm_weight: torch.Tensor | None, eps: float,
          residual: torch.Tensor | None, silu_mul: bool, config: GemvConfig | None) -> torch.Tensor:
    M, K = x.shape
    if (weight.dim() != 2 or weight.shape[1] != K or weight.dtype != x.dtype or not weight.is_contiguous()
            or (norm_weight is not None and norm_weight.shape != (K,))
            or (residual is not None and (residual.shape != (M, N) or residual.dtype != x.dtype))):
        raise ValueError(f"gemv: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype} "
                         f"(contiguous: {weight.is_contiguous()}), norm_weight "
                         f"{None if norm_weight is None else tuple(norm_weight.shape)}, residual "
                         f"{None if residual is None else (tuple(residual.shape), residual.dtype)}")
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"gemv: {M} rows, the Triton path takes 1..{MAX_ROWS}")
    x = unit_last(x)
    residual = None if residual is None else unit_last(residual)
    norm_weight = None if norm_weight is None else norm_weight.contiguous()
    cfg = config or default_config(M, K, x.element_size(), norm_weight is not None, silu_mul)
    m_pad = _pow2(M)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _gemv_kernel[(-(-N // cfg.block_n),)](
        x, norm_weight, weight, residual, out, M, N, x.stride(0),
        0 if residual is None else residual.stride(0), out.stride(0), eps,
        K=K, M_PAD=m_pad, BN=cfg.block_n, BK=cfg.block_k,
        BK_NORM=max(cfg.block_k, min(_pow2(K), NORM_ELEMS // m_pad)), NUM_STAGES=cfg.num_stages,
        PRELOAD=cfg.preload, BKP=_pow2(K), HAS_NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, SILU_MUL=silu_mul,
        NL=pdl.prefetch_lines(cfg.block_n, K, weight.element_size()),
        LINE=pdl.LINE_BYTES // weight.element_size(), num_warps=cfg.num_warps, **pdl.options(x),
    )
    return out


def rmsnorm_linear_triton(h: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor, *,
                          config: GemvConfig | None = None) -> torch.Tensor:
    """See ``rmsnorm_linear_ref``."""
    return _gemv(h, weight, weight.shape[0], norm_weight, eps, None, False, config)


def linear_residual_triton(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor, *,
                           config: GemvConfig | None = None) -> torch.Tensor:
    """See ``linear_residual_ref``."""
    return _gemv(x, weight, weight.shape[0], None, 0.0, residual, False, config)


def rmsnorm_linear_silu_mul_triton(h: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                                   weight_gate_up: torch.Tensor, *,
                                   config: GemvConfig | None = None) -> torch.Tensor:
    """See ``rmsnorm_linear_silu_mul_ref``."""
    if weight_gate_up.shape[0] % 2:
        raise ValueError(f"rmsnorm_linear_silu_mul: weight_gate_up has {weight_gate_up.shape[0]} rows, "
                         "expected 2 * I")
    return _gemv(h, weight_gate_up, weight_gate_up.shape[0] // 2, norm_weight, eps, None, True, config)
