"""The mixer's inputs to the Fenwick kernels: conv, Δ, g and λ, for decode (one launch) and prefill (two).

Everything of ``LogLinearMamba2Mixer.decode`` / ``prefill`` between ``in_proj`` and the attention kernel:
the depthwise causal conv over each slot's saved window and the new inputs (the window is updated in
place), SiLU, Δ = softplus(dt + dt_bias), g = -exp(A_log) Δ, v = x Δ and λ (linear, MLP or none).
``mixer_decode_inputs_ref`` (one token per row) and ``mixer_prefill_inputs_ref`` (sequences packed along
the rows) are the specification and the CPU path: they follow the mixer's ops and roundings exactly.
The Triton decode form runs one program per (row, block of conv channels) and one per (row, head), reads
slots on the device and allocates only its outputs, so it can be captured in a CUDA graph. The Triton
prefill form runs the conv (xBC, v) in one launch over tiles of rows x conv channels, then g, λ and the
new windows in a second (see ``_triton``). Neither synchronises with the host.
``triton`` is imported on the first CUDA call, so this module imports without it.
"""

from __future__ import annotations

from functools import cache
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import pdl

LAMBDA_MODES = ("linear", "mlp", "none")
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _check(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor, conv_weight: torch.Tensor,
           conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor, I: int, G: int, K: int,
           H: int, V: int, Lv: int, mode: str, lambda_L: torch.Tensor | None,
           fc: tuple[torch.Tensor | None, ...], N: int | None = None) -> tuple[int, int]:
    """Validate shapes (host metadata only, no synchronisation); returns (conv_dim, W).

    N: the number of slots, one per row of proj unless given.
    """
    D = I + 2 * G * K
    W = conv_weight.shape[-1]
    N = proj.shape[0] if N is None else N
    if I != H * V:
        raise ValueError(f"intermediate_size ({I}) must be num_heads * head_dim ({H} * {V})")
    if proj.dim() != 2 or proj.shape[1] != I + D + H * (1 + Lv):
        raise ValueError(f"proj must be [rows, {I + D + H * (1 + Lv)}], got {tuple(proj.shape)}")
    if conv_weight.shape != (D, W) or W < 2 or conv_pool.dim() != 3 or conv_pool.shape[1:] != (D, W - 1):
        raise ValueError(f"conv_weight must be [{D}, W >= 2] and conv_pool [P, {D}, W - 1], got "
                         f"{tuple(conv_weight.shape)} and {tuple(conv_pool.shape)}")
    if conv_bias is not None and conv_bias.shape != (D,):
        raise ValueError(f"conv_bias must be [{D}], got {tuple(conv_bias.shape)}")
    if slots.shape != (N,) or dt_bias.shape != (H,) or A_log.shape != (H,):
        raise ValueError(f"slots must be [{N}] and dt_bias, A_log [{H}], got {tuple(slots.shape)}, "
                         f"{tuple(dt_bias.shape)}, {tuple(A_log.shape)}")
    if mode not in LAMBDA_MODES:
        raise ValueError(f"lambda_mode must be one of {LAMBDA_MODES}, got {mode!r}")
    if mode == "linear" and (lambda_L is None or lambda_L.shape != (H, Lv)):
        raise ValueError(f"lambda_mode 'linear' needs lambda_L [{H}, {Lv}]")
    if mode == "mlp":
        fc1_w, fc1_b, fc2_w, fc2_b = fc
        if fc1_w is None or fc1_b is None or fc2_w is None or fc2_b is None:
            raise ValueError("lambda_mode 'mlp' needs fc1_w, fc1_b, fc2_w and fc2_b")
        hid = fc1_w.shape[0]
        if (fc1_w.shape != (hid, Lv) or fc1_b.shape != (hid,) or fc2_w.shape != (Lv, hid)
                or fc2_b.shape != (Lv,)):
            raise ValueError(f"λ MLP must be fc1 [hidden, {Lv}] + [hidden], fc2 [{Lv}, hidden] + [{Lv}], got "
                             f"{[tuple(t.shape) for t in fc]}")
    return D, W


def _check_varlen(proj: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
    """Validate cu_seqlens's shape, dtype and device (not its values: that would synchronise); returns N."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be [N + 1] int32 or int64, got {tuple(cu_seqlens.shape)} "
                         f"{cu_seqlens.dtype}")
    if cu_seqlens.device != proj.device:
        raise ValueError(f"cu_seqlens must be on proj's device ({proj.device}), got {cu_seqlens.device}")
    return cu_seqlens.numel() - 1


def mixer_decode_inputs_ref(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                            conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                            A_log: torch.Tensor, *, intermediate_size: int, n_groups: int, state_size: int,
                            num_heads: int, head_dim: int, lambda_levels: int, lambda_mode: str,
                            lambda_L: torch.Tensor | None = None, fc1_w: torch.Tensor | None = None,
                            fc1_b: torch.Tensor | None = None, fc2_w: torch.Tensor | None = None,
                            fc2_b: torch.Tensor | None = None) -> Outputs:
    """The decode inputs of N rows, one token each; shifts ``conv_pool[slots]`` in place.

    With I = intermediate_size, G = n_groups, K = state_size, H = num_heads, V = head_dim,
    Lv = lambda_levels, D = conv_dim = I + 2 G K and W the conv kernel:

    Args:
        proj: [N, I + D + H + H * Lv] in_proj output in the model dtype, z | xBC | dt | dl.
        conv_pool: [P, D, W - 1] the last W - 1 conv inputs of each slot, oldest first; the rows
            ``slots`` shift left by one and take this token's xBC input.
        slots: [N] int, distinct rows of conv_pool.
        conv_weight: [D, W] (``conv1d.weight[:, 0]``, model dtype); conv_bias: [D] or None.
        dt_bias, A_log: [H] float32.
        lambda_mode: "linear" (λ = softplus(lambda_L * dl), lambda_L [H, Lv] float32), "mlp"
            (λ = softplus(fc2(gelu(fc1(dl)))) per (row, head); fc1_w [hidden, Lv], fc1_b [hidden],
            fc2_w [Lv, hidden], fc2_b [Lv], float32) or "none" (λ = 1).
    Returns:
        xBC: [N, D] model dtype, silu(conv) (x | B | C: the views x [N, H, V], k = B and q = C [N, G, K]);
        v: [N, H, V] model dtype, x Δ; g: [N, H] float32, -exp(A_log) Δ with Δ = softplus(dt + dt_bias);
        lam: [N, H, Lv] float32.
    """
    I, G, K, H, V, Lv = intermediate_size, n_groups, state_size, num_heads, head_dim, lambda_levels
    fc = (fc1_w, fc1_b, fc2_w, fc2_b)
    D, _ = _check(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G, K, H, V, Lv,
                  lambda_mode, lambda_L, fc)
    _, xBC, dt, dl = proj.split([I, D, H, H * Lv], dim=-1)
    window = torch.cat([conv_pool[slots], xBC[:, :, None].to(conv_pool.dtype)], -1)  # (N, D, W)
    conv_pool[slots] = window[:, :, 1:]
    acc = (window.float() * conv_weight).sum(-1)  # float32: the weight (model dtype) promotes
    if conv_bias is not None:
        acc = acc + conv_bias
    xBC = F.silu(acc).to(proj.dtype)  # (N, D)
    return xBC, *_heads_ref(xBC, dt, dl, dt_bias, A_log, I, H, V, Lv, lambda_mode, lambda_L, fc)


def mixer_prefill_inputs_ref(proj: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                             slots: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                             dt_bias: torch.Tensor, A_log: torch.Tensor, *, intermediate_size: int,
                             n_groups: int, state_size: int, num_heads: int, head_dim: int,
                             lambda_levels: int, lambda_mode: str, lambda_L: torch.Tensor | None = None,
                             fc1_w: torch.Tensor | None = None, fc1_b: torch.Tensor | None = None,
                             fc2_w: torch.Tensor | None = None, fc2_b: torch.Tensor | None = None) -> Outputs:
    """The prefill inputs of N sequences packed along the rows; writes their new conv windows in place.

    Each row is ``mixer_decode_inputs_ref`` of one token, its conv window made of the W - 1 inputs before
    it in its own sequence: earlier rows of the sequence, then (for its first W - 1 tokens) the saved
    window. As in ``LogLinearMamba2Mixer.prefill``, saved and new inputs meet in the conv in the model
    dtype, and the new window (the last W - 1 inputs of [saved window; new inputs]) is stored in
    conv_pool's dtype. Shapes and λ as in ``mixer_decode_inputs_ref``, with T = T_total:

    Args:
        proj: [T, I + D + H + H * Lv] in_proj output of the N sequences, packed along the rows.
        cu_seqlens: [N + 1] int32 or int64 on proj's device, cumulative lengths from 0 to T; every
            sequence has at least one row (not checked: that would synchronise).
        conv_pool: [P, D, W - 1]; its rows ``slots`` are read as the sequences' saved windows, then
            replaced by their new windows. slots: [N] int, distinct rows of conv_pool.
    Returns:
        xBC: [T, D] model dtype; v: [T, H, V] model dtype; g: [T, H] float32; lam: [T, H, Lv] float32.
    """
    I, G, K, H, V, Lv = intermediate_size, n_groups, state_size, num_heads, head_dim, lambda_levels
    fc = (fc1_w, fc1_b, fc2_w, fc2_b)
    N = _check_varlen(proj, cu_seqlens)
    D, W = _check(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G, K, H, V, Lv,
                  lambda_mode, lambda_L, fc, N)
    _, xBC, dt, dl = proj.split([I, D, H, H * Lv], dim=-1)
    cu = cu_seqlens.long()
    rows = torch.arange(proj.shape[0], device=proj.device)
    seq = torch.searchsorted(cu, rows, right=True) - 1  # (T,) the sequence of each row
    saved = conv_pool[slots].transpose(1, 2).flatten(0, 1).to(proj.dtype)  # (N * (W-1), D)
    ext = torch.cat([saved, xBC])  # (N * (W-1) + T, D)
    taps = torch.arange(1 - W, 1, device=proj.device)  # (W,) window positions relative to the row
    src = _ext_rows(cu, seq, rows[:, None] + taps, W)  # (T, W)
    acc = sum(ext[src[:, w]].float() * conv_weight[:, w].float() for w in range(W))  # (T, D) float32
    if conv_bias is not None:
        acc = acc + conv_bias.float()
    xBC = F.silu(acc).to(proj.dtype)  # (T, D)
    last = _ext_rows(cu, torch.arange(N, device=proj.device), cu[1:, None] + taps[:-1], W)  # (N, W-1)
    conv_pool[slots] = ext[last].transpose(1, 2).to(conv_pool.dtype)
    return xBC, *_heads_ref(xBC, dt, dl, dt_bias, A_log, I, H, V, Lv, lambda_mode, lambda_L, fc)


def _heads_ref(xBC: torch.Tensor, dt: torch.Tensor, dl: torch.Tensor, dt_bias: torch.Tensor,
               A_log: torch.Tensor, I: int, H: int, V: int, Lv: int, mode: str, lambda_L: torch.Tensor | None,
               fc: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xBC: [R, D] after conv + SiLU; dt: [R, H]; dl: [R, H * Lv] -> v [R, H, V], g [R, H], λ [R, H, Lv]."""
    x = xBC[:, :I].unflatten(-1, (H, V))  # (R, H, V)
    delta = F.softplus(dt + dt_bias)  # (R, H) float32: the sum promotes dt
    g = -torch.exp(A_log) * delta
    v = (x.float() * delta[..., None]).to(x.dtype)
    dl = dl.unflatten(-1, (H, Lv))  # (R, H, Lv)
    if mode == "linear":
        lam = F.softplus(lambda_L * dl)
    elif mode == "mlp":
        fc1_w, fc1_b, fc2_w, fc2_b = fc
        lam = F.softplus(F.linear(F.gelu(F.linear(dl.float(), fc1_w, fc1_b)), fc2_w, fc2_b))
    else:
        lam = torch.ones(dl.shape, device=dl.device, dtype=torch.float32)
    return v, g, lam


def _ext_rows(cu: torch.Tensor, seq: torch.Tensor, pos: torch.Tensor, W: int) -> torch.Tensor:
    """Rows of ext = [N saved windows of W - 1 rows each; T packed inputs] that hold packed row ``pos`` of
    sequence ``seq`` (seq: [R], pos: [R, S]); rows before the sequence's start fall in its saved window."""
    N = cu.numel() - 1
    rel = pos - cu[seq][:, None]  # (R, S) position within the sequence, negative in the saved window
    return torch.where(rel >= 0, N * (W - 1) + pos, seq[:, None] * (W - 1) + (W - 1) + rel)


@cache
def _triton() -> SimpleNamespace | None:
    """The Triton implementations (``decode``, ``prefill``), defined on first use; None where triton
    cannot be imported.

    ``triton``, ``tl`` and the helpers ``_softplus`` and ``wait_then_release`` are bound as module
    globals: the interpreter (TRITON_INTERPRET=1) re-executes the kernel's source in its module's
    globals, without closures.

    Prefill runs in two launches. The first, the conv, has a grid (row blocks of BT, channel blocks of
    BC): each program finds its rows' sequences by a binary search of cu_seqlens and sums the W taps with
    the weights loaded once per tile; a block whose windows all lie inside their sequences reads proj
    alone, the others also gather saved windows. It writes xBC and, from Δ of the heads a block
    touches, v. The second takes BM (row, head) pairs per program for g and λ (the λ MLP as two dots,
    its weights loaded once per program; on the GPU as "tf32x3", three TF32 tensor-core products of about
    fp32 accuracy, since FMA-loop fp32 dots ran 2.5x slower) and one program per (sequence, channel
    block) for the new windows: being a later launch, it writes conv_pool only once every conv tap has
    read it.
    """
    global triton, tl, _softplus, wait_then_release
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None
    from .pdl_triton import wait_then_release

    @triton.jit
    def _softplus(x):
        # torch's softplus (beta 1, threshold 20) as max(x, 0) + log1p(exp(-|x|)), with log1p(u) by its
        # atanh series in s = u / (2 + u) <= 1/3 (truncated: < 2e-8 relative) instead of tl.log, which
        # may be a fast approximation on the device
        u = tl.exp(-tl.abs(x))
        s = u / (2.0 + u)
        s2 = s * s
        p = 1.0 / 11 + s2 / 13
        p = 1.0 / 9 + s2 * p
        p = 1.0 / 7 + s2 * p
        p = 1.0 / 5 + s2 * p
        p = 1.0 / 3 + s2 * p
        p = 1.0 + s2 * p
        return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + 2.0 * s * p)

    @triton.jit
    def _mixer_step_kernel(
        proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, lam_L, fc1_w, fc1_b, fc2_w, fc2_b,
        xbc, v, g, lam,
        s_pn, s_cp, s_cd, s_cw, s_wd, s_ww,
        I: tl.constexpr, D: tl.constexpr, H: tl.constexpr, V: tl.constexpr, LV: tl.constexpr,
        HID: tl.constexpr, W: tl.constexpr, BC: tl.constexpr, BL: tl.constexpr, BJ: tl.constexpr,
        NC: tl.constexpr, LAMBDA: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        # USE_PDL (kernels.pdl): the weights, the slot and this slot's conv window (this kernel's own
        # state, written one decode step earlier; read past L1) load before the wait, and the window
        # shifts; proj, the previous kernel's output, is read after it
        i_n, i_b = tl.program_id(0), tl.program_id(1)
        p_dt = proj + i_n * s_pn + I + D
        if i_b < NC:
            # channels o_c of row i_n: the conv window is read and shifted by this program only
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
                b_delta = _softplus(b_dt + b_dtb)
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
            b_delta = _softplus(tl.load(p_dt + i_h).to(tl.float32) + b_dtb_h)
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
                tl.store(p_lam, _softplus(b_a), mask=m_l)

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
        D, W = _check(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G, K, H, V, Lv,
                      lambda_mode, lambda_L, fc)
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
            # taps before the sequence's start read its saved window, in the model dtype
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
                b_d = _softplus(tl.load(p_row + I + D + i_h, mask=m_t, other=0.0).to(tl.float32)
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
            b_delta = _softplus(tl.load(p_dt + o_h, mask=m_m, other=0.0).to(tl.float32)
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
                tl.store(p_lam, _softplus(b_a), mask=m_ml)
        else:
            # the new window of sequence i_n, channels o_c: entry j is entry len + j of [saved window;
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
        N = _check_varlen(proj, cu_seqlens)
        D, W = _check(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G, K, H, V, Lv,
                      lambda_mode, lambda_L, fc, N)
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
        # after the conv has read every saved window: g, λ and the new windows
        NM = triton.cdiv(T * H, block_m)
        _prefill_heads_kernel[(NM + N * NC,)](
            proj, cu_seqlens, conv_pool, slots, dt_bias, A_log, lambda_L, *fc, g, lam,
            T, NM, proj.stride(0), *s_pool,
            I=I, D=D, H=H, LV=Lv, HID=HID, W=W, BM=block_m, BL=max(16, triton.next_power_of_2(Lv)),
            BJ=max(16, triton.next_power_of_2(HID)), BC=BC, NC=NC, LAMBDA=lambda_mode,
            PREC="tf32x3" if proj.is_cuda else "ieee", num_warps=4,
        )
        return xbc, v, g, lam

    return SimpleNamespace(decode=mixer_decode_inputs_triton, prefill=mixer_prefill_inputs_triton)


def mixer_decode_inputs(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                        conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                        A_log: torch.Tensor, *, intermediate_size: int, n_groups: int, state_size: int,
                        num_heads: int, head_dim: int, lambda_levels: int, lambda_mode: str,
                        lambda_L: torch.Tensor | None = None, fc1_w: torch.Tensor | None = None,
                        fc1_b: torch.Tensor | None = None, fc2_w: torch.Tensor | None = None,
                        fc2_b: torch.Tensor | None = None) -> Outputs:
    """Triton on CUDA tensors, else the reference. See ``mixer_decode_inputs_ref`` for shapes."""
    ops = _triton() if proj.is_cuda else None
    impl = ops.decode if ops else mixer_decode_inputs_ref
    return impl(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log,
                intermediate_size=intermediate_size, n_groups=n_groups, state_size=state_size,
                num_heads=num_heads, head_dim=head_dim, lambda_levels=lambda_levels, lambda_mode=lambda_mode,
                lambda_L=lambda_L, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)


def mixer_prefill_inputs(proj: torch.Tensor, cu_seqlens: torch.Tensor, conv_pool: torch.Tensor,
                         slots: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                         dt_bias: torch.Tensor, A_log: torch.Tensor, *, intermediate_size: int, n_groups: int,
                         state_size: int, num_heads: int, head_dim: int, lambda_levels: int, lambda_mode: str,
                         lambda_L: torch.Tensor | None = None, fc1_w: torch.Tensor | None = None,
                         fc1_b: torch.Tensor | None = None, fc2_w: torch.Tensor | None = None,
                         fc2_b: torch.Tensor | None = None) -> Outputs:
    """Triton on CUDA tensors, else the reference. See ``mixer_prefill_inputs_ref`` for shapes."""
    ops = _triton() if proj.is_cuda else None
    impl = ops.prefill if ops else mixer_prefill_inputs_ref
    return impl(proj, cu_seqlens, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log,
                intermediate_size=intermediate_size, n_groups=n_groups, state_size=state_size,
                num_heads=num_heads, head_dim=head_dim, lambda_levels=lambda_levels, lambda_mode=lambda_mode,
                lambda_L=lambda_L, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)
