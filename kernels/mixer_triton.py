"""The mixer's inputs to the Fenwick kernels in Triton (references: ``mixer_torch.py``).

The decode form runs one program per (row, block of conv channels) and one per (row, head), reads
slots on the device and allocates only its outputs, so it can be captured in a CUDA graph. Prefill runs
in two launches. The first, the conv, has a grid (row blocks of BT, channel blocks of BC): each program
finds its rows' sequences by a binary search of cu_seqlens and sums the W taps with the weights loaded
once per tile; a block whose conv states all lie inside their sequences reads proj alone, the others
also gather saved conv states. It writes xBC and, from Δ of the heads a block touches, v. The second
takes BM (row, head) pairs per program for g and λ (the λ MLP as two dots, its weights loaded once per
program; on the GPU as "tf32x3", three TF32 tensor-core products of about fp32 accuracy, since FMA-loop
fp32 dots were slower) and one program per (sequence, channel block) for the new conv states: being a
later launch, it writes conv_pool only once every conv tap has read it. Neither synchronises with the
host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import pdl
from .mixer_torch import Outputs, check_mixer_inputs, check_varlen
from .triton_utils import softplus, wait_then_release


@triton.jit
def _mixer_step_kernel(
    proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, lam_L, fc1_w, fc1_b, fc2_w, fc2_b,
    xbc, v, g, lam,
    s_pn, s_cp, s_cd, s_cw, s_wd, s_ww,
    I: tl.constexpr, D: tl.constexpr, H: tl.constexpr, V: tl.constexpr, LV: tl.constexpr,
    HID: tl.constexpr, W: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, BJ: tl.constexpr,
    NC: tl.constexpr, LAMBDA: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
):
    # USE_PDL (kernels.pdl): the weights, the slot and this slot's conv state (this kernel's own
    # state, written one decode step earlier; read past L1) load before the wait, and the window
    # shifts; proj, the previous kernel's output, is read after it
    i_n, i_b = tl.program_id(0), tl.program_id(1)
    p_dt = proj + i_n * s_pn + I + D
    if i_b < NC:
        # channels o_c of row i_n: the conv state is read and shifted by this program only
        i_s = tl.load(slots + i_n).to(tl.int64)
        o_c = i_b * BC + tl.arange(0, BC)
        m_c = o_c < D
        m_x = o_c < I
        o_h = o_c // V
        p_win = conv_pool + i_s * s_cp + o_c * s_cd
        b_acc = tl.zeros([BC], dtype=tl.float32)
        for w in tl.static_range(W - 1):  # the window's taps, shifted down by one as they are read
            b_x = tl.load(p_win + w * s_cw, mask=m_c, other=0.0, cache_modifier=".cg")
            b_w = tl.load(conv_weight + o_c * s_wd + w * s_ww, mask=m_c, other=0.0)
            b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)
            if w > 0:
                tl.store(p_win + (w - 1) * s_cw, b_x, mask=m_c)
        b_w = tl.load(conv_weight + o_c * s_wd + (W - 1) * s_ww, mask=m_c, other=0.0)
        if HAS_BIAS:
            b_bias = tl.load(conv_bias + o_c, mask=m_c, other=0.0).to(tl.float32)
        b_dtb = tl.load(dt_bias + o_h, mask=m_x, other=0.0)
        wait_then_release(USE_PDL)
        b_x = tl.load(proj + i_n * s_pn + I + o_c, mask=m_c, other=0.0).to(conv_pool.dtype.element_ty)
        b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)
        tl.store(p_win + (W - 2) * s_cw, b_x, mask=m_c)
        if HAS_BIAS:
            b_acc += b_bias
        b_y = (b_acc / (1.0 + tl.exp(-b_acc))).to(xbc.dtype.element_ty)
        tl.store(xbc + i_n * D + o_c, b_y, mask=m_c)
        if i_b * BC < I:
            b_dt = tl.load(p_dt + o_h, mask=m_x, other=0.0).to(tl.float32)
            b_delta = softplus(b_dt + b_dtb)
            tl.store(v + i_n * I + o_c, (b_y.to(tl.float32) * b_delta).to(v.dtype.element_ty), mask=m_x)
    else:
        i_h = i_b - NC
        o_l = tl.arange(0, BL)
        m_l = o_l < LV
        b_dtb_h, b_A = tl.load(dt_bias + i_h), tl.load(A_log + i_h)
        if LAMBDA == "linear":
            b_L = tl.load(lam_L + i_h * LV + o_l, mask=m_l, other=0.0)
        elif LAMBDA == "mlp":
            o_j = tl.arange(0, BJ)
            m_j = o_j < HID
            m_jl = m_j[:, None] & m_l[None, :]
            b_w1 = tl.load(fc1_w + o_j[:, None] * LV + o_l[None, :], mask=m_jl, other=0.0)  # (BJ, BL)
            b_b1 = tl.load(fc1_b + o_j, mask=m_j, other=0.0)
            b_w2 = tl.load(fc2_w + o_l[None, :] * HID + o_j[:, None], mask=m_jl, other=0.0)  # fc2ᵀ
            b_b2 = tl.load(fc2_b + o_l, mask=m_l, other=0.0)
        wait_then_release(USE_PDL)
        b_delta = softplus(tl.load(p_dt + i_h).to(tl.float32) + b_dtb_h)
        tl.store(g + i_n * H + i_h, -tl.exp(b_A) * b_delta)
        p_lam = lam + (i_n * H + i_h) * LV + o_l
        if LAMBDA == "none":
            tl.store(p_lam, tl.full([BL], 1.0, dtype=tl.float32), mask=m_l)
        else:
            b_dl = tl.load(p_dt + H + i_h * LV + o_l, mask=m_l, other=0.0).to(tl.float32)
            if LAMBDA == "linear":
                b_a = b_L * b_dl
            else:
                b_h = tl.sum(b_w1 * b_dl[None, :], axis=1) + b_b1
                b_h = b_h * 0.5 * (1.0 + tl.math.erf(b_h * 0.7071067811865476))  # exact GELU
                b_a = tl.sum(b_w2 * b_h[:, None], axis=0) + b_b2
            tl.store(p_lam, softplus(b_a), mask=m_l)

def mixer_decode_inputs_triton(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                               conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                               dt_bias: torch.Tensor, A_log: torch.Tensor, *, intermediate_size: int,
                               n_groups: int, state_size: int, num_heads: int, head_dim: int,
                               lambda_levels: int, lambda_mode: str, lambda_L: torch.Tensor | None = None,
                               fc1_w: torch.Tensor | None = None, fc1_b: torch.Tensor | None = None,
                               fc2_w: torch.Tensor | None = None, fc2_b: torch.Tensor | None = None,
                               block_c: int = 256) -> Outputs:
    """Same contract as ``mixer_decode_inputs_ref``; ``block_c``: conv channels per program. With PDL
    (kernels.pdl) only proj is read after the wait: conv_pool and slots must not be written by the
    kernel launched just before this one."""
    I, G, K, H, V, Lv = intermediate_size, n_groups, state_size, num_heads, head_dim, lambda_levels
    fc = (fc1_w, fc1_b, fc2_w, fc2_b)
    D, W = check_mixer_inputs(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G,
                              K, H, V, Lv, lambda_mode, lambda_L, fc)
    N = proj.shape[0]
    xbc = torch.empty(N, D, dtype=proj.dtype, device=proj.device)
    v = torch.empty(N, H, V, dtype=proj.dtype, device=proj.device)
    g = torch.empty(N, H, dtype=torch.float32, device=proj.device)
    lam = torch.empty(N, H, Lv, dtype=torch.float32, device=proj.device)
    if N == 0:
        return xbc, v, g, lam
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    small = [t if t is None else t.contiguous() for t in (conv_bias, dt_bias, A_log, lambda_L, *fc)]
    HID = fc1_w.shape[0] if lambda_mode == "mlp" else 1
    BC = min(max(16, triton.next_power_of_2(D)), block_c)
    NC = triton.cdiv(D, BC)
    _mixer_step_kernel[(N, NC + H)](
        proj, conv_pool, slots, conv_weight, *small, xbc, v, g, lam,
        proj.stride(0), conv_pool.stride(0), conv_pool.stride(1), conv_pool.stride(2),
        conv_weight.stride(0), conv_weight.stride(1),
        I=I, D=D, H=H, V=V, LV=Lv, HID=HID, W=W, BC=BC, BL=max(16, triton.next_power_of_2(Lv)),
        BJ=max(16, triton.next_power_of_2(HID)), NC=NC, LAMBDA=lambda_mode,
        HAS_BIAS=conv_bias is not None, num_warps=4 if BC >= 512 else 2, **pdl.options(proj),
    )
    return xbc, v, g, lam

# T, N, n_bits and NM change with every batch: Triton would compile a new kernel for each value
# that is 1 or a multiple of 16 (its integer specialisations), in the middle of serving
@triton.jit(do_not_specialize=["T", "N", "n_bits"])
def _prefill_conv_kernel(
    proj, cu_seqlens, conv_pool, slots, conv_weight, conv_bias, dt_bias, xbc, v,
    T, N, n_bits, s_pt, s_cp, s_cd, s_cw, s_wd, s_ww,
    I: tl.constexpr, D: tl.constexpr, H: tl.constexpr, V: tl.constexpr, W: tl.constexpr,
    BT: tl.constexpr, BC: tl.constexpr, NHC: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    i_t, i_c = tl.program_id(0), tl.program_id(1)
    o_t = i_t * BT + tl.arange(0, BT)
    o_c = i_c * BC + tl.arange(0, BC)
    m_t, m_c = o_t < T, o_c < D
    m_tc = m_t[:, None] & m_c[None, :]
    # the sequence of each row: the last n < N with cu_seqlens[n] <= row, found bit by bit
    b_n = tl.zeros([BT], dtype=tl.int32)
    for k in range(n_bits):
        b_try = b_n + ((1 << (n_bits - 1)) >> k)
        m_try = b_try < N
        b_bos = tl.load(cu_seqlens + b_try, mask=m_try, other=0)
        b_n = tl.where(m_try & (b_bos <= o_t), b_try, b_n)
    b_off = o_t - tl.load(cu_seqlens + b_n).to(tl.int32)  # (BT,) row within its sequence
    p_row = proj + o_t.to(tl.int64) * s_pt  # (BT,)
    p_x = p_row[:, None] + I + o_c[None, :]  # (BT, BC) this row's conv inputs
    p_w = conv_weight + o_c * s_wd
    b_acc = tl.zeros([BT, BC], dtype=tl.float32)
    if tl.min(tl.where(m_t, b_off, W - 1)) >= W - 1:
        # no row's window reaches back past its sequence's start: every tap is a row of proj
        for w in tl.static_range(W):
            b_x = tl.load(p_x + (w - (W - 1)) * s_pt, mask=m_tc, other=0.0)
            b_w = tl.load(p_w + w * s_ww, mask=m_c, other=0.0)
            b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)[None, :]
    else:
        # taps before the sequence's start read its saved conv state, in the model dtype
        b_slot = tl.load(slots + b_n).to(tl.int64)
        p_old = conv_pool + b_slot[:, None] * s_cp + o_c[None, :] * s_cd  # (BT, BC)
        for w in tl.static_range(W):
            b_rel = b_off + (w - (W - 1))
            m_old = m_tc & (b_rel < 0)[:, None]
            b_x = tl.load(p_x + (w - (W - 1)) * s_pt, mask=m_tc & (b_rel >= 0)[:, None], other=0.0)
            b_old = tl.load(p_old + (b_rel + W - 1)[:, None] * s_cw, mask=m_old, other=0.0)
            b_x = tl.where(m_old, b_old.to(proj.dtype.element_ty), b_x)
            b_w = tl.load(p_w + w * s_ww, mask=m_c, other=0.0)
            b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)[None, :]
    if HAS_BIAS:
        b_acc += tl.load(conv_bias + o_c, mask=m_c, other=0.0).to(tl.float32)[None, :]
    b_y = (b_acc / (1.0 + tl.exp(-b_acc))).to(xbc.dtype.element_ty)
    tl.store(xbc + o_t.to(tl.int64)[:, None] * D + o_c[None, :], b_y, mask=m_tc)
    if i_c * BC < I:
        # v = x Δ: Δ of the NHC heads the block touches, one per row, spread over their channels
        m_tx = m_t[:, None] & (o_c < I)[None, :]
        i_h0 = (i_c * BC) // V
        o_hl = o_c // V - i_h0
        b_delta = tl.zeros([BT, BC], dtype=tl.float32)
        for j in tl.static_range(NHC):
            i_h = tl.minimum(i_h0 + j, H - 1)  # past the last head only for channels >= I, not stored
            b_d = softplus(tl.load(p_row + I + D + i_h, mask=m_t, other=0.0).to(tl.float32)
                            + tl.load(dt_bias + i_h))
            b_delta = tl.where(o_hl[None, :] == j, b_d[:, None], b_delta)
        tl.store(v + o_t.to(tl.int64)[:, None] * I + o_c[None, :],
                 (b_y.to(tl.float32) * b_delta).to(v.dtype.element_ty), mask=m_tx)

@triton.jit(do_not_specialize=["T", "NM"])
def _prefill_heads_kernel(
    proj, cu_seqlens, conv_pool, slots, dt_bias, A_log, lam_L, fc1_w, fc1_b, fc2_w, fc2_b, g, lam,
    T, NM, s_pt, s_cp, s_cd, s_cw,
    I: tl.constexpr, D: tl.constexpr, H: tl.constexpr, LV: tl.constexpr, HID: tl.constexpr,
    W: tl.constexpr, BM: tl.constexpr, BL: tl.constexpr, BJ: tl.constexpr, BC: tl.constexpr,
    NC: tl.constexpr, LAMBDA: tl.constexpr, PREC: tl.constexpr,
):
    i_p = tl.program_id(0)
    if i_p < NM:
        # BM (row, head) pairs, row-major as in g and lam
        o_m = i_p * BM + tl.arange(0, BM)
        m_m = o_m < T * H
        o_h = o_m % H
        p_dt = proj + (o_m // H).to(tl.int64) * s_pt + I + D  # (BM,)
        b_delta = softplus(tl.load(p_dt + o_h, mask=m_m, other=0.0).to(tl.float32)
                            + tl.load(dt_bias + o_h, mask=m_m, other=0.0))
        tl.store(g + o_m, -tl.exp(tl.load(A_log + o_h, mask=m_m, other=0.0)) * b_delta, mask=m_m)
        o_l = tl.arange(0, BL)
        m_l = o_l < LV
        m_ml = m_m[:, None] & m_l[None, :]
        p_lam = lam + o_m[:, None] * LV + o_l[None, :]  # (BM, BL)
        if LAMBDA == "none":
            tl.store(p_lam, tl.full([BM, BL], 1.0, dtype=tl.float32), mask=m_ml)
        else:
            p_dl = p_dt[:, None] + H + o_h[:, None] * LV + o_l[None, :]
            b_dl = tl.load(p_dl, mask=m_ml, other=0.0).to(tl.float32)  # (BM, BL)
            if LAMBDA == "linear":
                b_a = tl.load(lam_L + o_h[:, None] * LV + o_l[None, :], mask=m_ml, other=0.0) * b_dl
            else:
                o_j = tl.arange(0, BJ)
                m_j = o_j < HID
                m_lj = m_l[:, None] & m_j[None, :]
                b_w1 = tl.load(fc1_w + o_j[None, :] * LV + o_l[:, None], mask=m_lj, other=0.0)  # fc1ᵀ
                b_h = tl.dot(b_dl, b_w1, input_precision=PREC)  # (BM, BJ)
                b_h += tl.load(fc1_b + o_j, mask=m_j, other=0.0)[None, :]
                b_h = b_h * 0.5 * (1.0 + tl.math.erf(b_h * 0.7071067811865476))  # exact GELU
                b_w2 = tl.load(fc2_w + o_l[None, :] * HID + o_j[:, None], mask=m_lj.T, other=0.0)  # fc2ᵀ
                b_a = tl.dot(b_h, b_w2, input_precision=PREC)  # (BM, BL)
                b_a += tl.load(fc2_b + o_l, mask=m_l, other=0.0)[None, :]
            tl.store(p_lam, softplus(b_a), mask=m_ml)
    else:
        # the new conv state of sequence i_n, channels o_c: entry j is entry len + j of [saved conv state;
        # the sequence's inputs], read from the window only at len + j > j, an entry not yet rewritten
        i_n, i_c = (i_p - NM) // NC, (i_p - NM) % NC
        bos = tl.load(cu_seqlens + i_n).to(tl.int64)
        i_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
        o_c = i_c * BC + tl.arange(0, BC)
        m_c = o_c < D
        p_win = conv_pool + tl.load(slots + i_n).to(tl.int64) * s_cp + o_c * s_cd
        for j in tl.static_range(W - 1):
            i_e = i_len + j
            if i_e < W - 1:
                b_x = tl.load(p_win + i_e * s_cw, mask=m_c, other=0.0).to(proj.dtype.element_ty)
            else:
                b_x = tl.load(proj + (bos + i_e - (W - 1)) * s_pt + I + o_c, mask=m_c, other=0.0)
            tl.store(p_win + j * s_cw, b_x.to(conv_pool.dtype.element_ty), mask=m_c)

def mixer_prefill_inputs_triton(proj: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                                slots: torch.Tensor, conv_weight: torch.Tensor,
                                conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                                A_log: torch.Tensor, *, intermediate_size: int, n_groups: int,
                                state_size: int, num_heads: int, head_dim: int, lambda_levels: int,
                                lambda_mode: str, lambda_L: torch.Tensor | None = None,
                                fc1_w: torch.Tensor | None = None, fc1_b: torch.Tensor | None = None,
                                fc2_w: torch.Tensor | None = None, fc2_b: torch.Tensor | None = None,
                                block_t: int = 32, block_c: int = 128, block_m: int = 64) -> Outputs:
    """Same contract as ``mixer_prefill_inputs_ref``; ``block_t`` rows x ``block_c`` conv channels per
    conv program, ``block_m`` (row, head) pairs (a power of two >= 16) per head program."""
    I, G, K, H, V, Lv = intermediate_size, n_groups, state_size, num_heads, head_dim, lambda_levels
    fc = (fc1_w, fc1_b, fc2_w, fc2_b)
    N = check_varlen(proj, cu_seqlens)
    D, W = check_mixer_inputs(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G,
                              K, H, V, Lv, lambda_mode, lambda_L, fc, N)
    T = proj.shape[0]
    xbc = torch.empty(T, D, dtype=proj.dtype, device=proj.device)
    v = torch.empty(T, H, V, dtype=proj.dtype, device=proj.device)
    g = torch.empty(T, H, dtype=torch.float32, device=proj.device)
    lam = torch.empty(T, H, Lv, dtype=torch.float32, device=proj.device)
    if T == 0 or N == 0:
        return xbc, v, g, lam
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    conv_bias, dt_bias, A_log, lambda_L, *fc = (t if t is None else t.contiguous()
                                                 for t in (conv_bias, dt_bias, A_log, lambda_L, *fc))
    HID = fc1_w.shape[0] if lambda_mode == "mlp" else 1
    BC = min(max(16, triton.next_power_of_2(D)), block_c)
    NC = triton.cdiv(D, BC)
    NHC = max((i * BC % V + BC - 1) // V + 1 for i in range(triton.cdiv(I, BC)))  # heads per block
    s_pool = conv_pool.stride()
    _prefill_conv_kernel[(triton.cdiv(T, block_t), NC)](
        proj, cu_seqlens, conv_pool, slots, conv_weight, conv_bias, dt_bias, xbc, v,
        T, N, N.bit_length(), proj.stride(0), *s_pool, conv_weight.stride(0), conv_weight.stride(1),
        I=I, D=D, H=H, V=V, W=W, BT=block_t, BC=BC, NHC=NHC, HAS_BIAS=conv_bias is not None, num_warps=4,
    )
    # after the conv has read every saved conv state: g, λ and the new conv states
    NM = triton.cdiv(T * H, block_m)
    _prefill_heads_kernel[(NM + N * NC,)](
        proj, cu_seqlens, conv_pool, slots, dt_bias, A_log, lambda_L, *fc, g, lam,
        T, NM, proj.stride(0), *s_pool,
        I=I, D=D, H=H, LV=Lv, HID=HID, W=W, BM=block_m, BL=max(16, triton.next_power_of_2(Lv)),
        BJ=max(16, triton.next_power_of_2(HID)), BC=BC, NC=NC, LAMBDA=lambda_mode,
        PREC="tf32x3" if proj.is_cuda else "ieee", num_warps=4,
    )
    return xbc, v, g, lam

