"""The mixer's decode inputs for one token per sequence: conv step, Δ, g and λ in one Triton launch.

Everything of ``LogLinearMamba2Mixer.decode`` between ``in_proj`` and ``fused_recurrent_step``: the
depthwise conv over each slot's saved window and the new input (the window is shifted in place), SiLU,
Δ = softplus(dt + dt_bias), g = -exp(A_log) Δ, v = x Δ and λ (linear, MLP or none).
``mixer_decode_inputs_ref`` is the specification and the CPU path: it follows the mixer's ops and
roundings exactly. The Triton form runs one program per (row, block of conv channels) and one per
(row, head), reads slots on the device and allocates only its outputs, so it can be captured in a CUDA
graph. ``triton`` is imported on the first CUDA call, so this module imports without it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

LAMBDA_MODES = ("linear", "mlp", "none")
Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _check(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor, conv_weight: torch.Tensor,
           conv_bias: torch.Tensor | None, dt_bias: torch.Tensor, A_log: torch.Tensor, I: int, G: int, K: int,
           H: int, V: int, Lv: int, mode: str, lambda_L: torch.Tensor | None,
           fc: tuple[torch.Tensor | None, ...]) -> tuple[int, int]:
    """Validate shapes (host metadata only, no synchronisation); returns (conv_dim, W)."""
    D = I + 2 * G * K
    W = conv_weight.shape[-1]
    N = proj.shape[0]
    if I != H * V:
        raise ValueError(f"intermediate_size ({I}) must be num_heads * head_dim ({H} * {V})")
    if proj.dim() != 2 or proj.shape[1] != I + D + H * (1 + Lv):
        raise ValueError(f"proj must be [N, {I + D + H * (1 + Lv)}], got {tuple(proj.shape)}")
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
    x = xBC[:, :I].unflatten(-1, (H, V))  # (N, H, V)
    delta = F.softplus(dt + dt_bias)  # (N, H) float32: the sum promotes dt
    g = -torch.exp(A_log) * delta
    v = (x.float() * delta[..., None]).to(x.dtype)
    dl = dl.unflatten(-1, (H, Lv))  # (N, H, Lv)
    if lambda_mode == "linear":
        lam = F.softplus(lambda_L * dl)
    elif lambda_mode == "mlp":
        lam = F.softplus(F.linear(F.gelu(F.linear(dl.float(), fc1_w, fc1_b)), fc2_w, fc2_b))
    else:
        lam = torch.ones(dl.shape, device=dl.device, dtype=torch.float32)
    return xBC, v, g, lam


@cache
def _triton() -> Callable[..., Outputs] | None:
    """The Triton implementation, defined on first use; None where triton cannot be imported.

    ``triton``, ``tl`` and the helper ``_softplus`` are bound as module globals: the interpreter
    (TRITON_INTERPRET=1) re-executes the kernel's source in its module's globals, without closures.
    """
    global triton, tl, _softplus
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

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
        NC: tl.constexpr, LAMBDA: tl.constexpr, HAS_BIAS: tl.constexpr,
    ):
        i_n, i_b = tl.program_id(0), tl.program_id(1)
        p_dt = proj + i_n * s_pn + I + D
        if i_b < NC:
            # channels o_c of row i_n: the conv window is read and shifted by this program only
            i_s = tl.load(slots + i_n).to(tl.int64)
            o_c = i_b * BC + tl.arange(0, BC)
            m_c = o_c < D
            p_win = conv_pool + i_s * s_cp + o_c * s_cd
            b_acc = tl.zeros([BC], dtype=tl.float32)
            for w in tl.static_range(W - 1):
                b_x = tl.load(p_win + w * s_cw, mask=m_c, other=0.0)
                b_w = tl.load(conv_weight + o_c * s_wd + w * s_ww, mask=m_c, other=0.0)
                b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)
                if w > 0:
                    tl.store(p_win + (w - 1) * s_cw, b_x, mask=m_c)
            b_x = tl.load(proj + i_n * s_pn + I + o_c, mask=m_c, other=0.0).to(conv_pool.dtype.element_ty)
            b_w = tl.load(conv_weight + o_c * s_wd + (W - 1) * s_ww, mask=m_c, other=0.0)
            b_acc += b_x.to(tl.float32) * b_w.to(tl.float32)
            tl.store(p_win + (W - 2) * s_cw, b_x, mask=m_c)
            if HAS_BIAS:
                b_acc += tl.load(conv_bias + o_c, mask=m_c, other=0.0).to(tl.float32)
            b_y = (b_acc / (1.0 + tl.exp(-b_acc))).to(xbc.dtype.element_ty)
            tl.store(xbc + i_n * D + o_c, b_y, mask=m_c)
            if i_b * BC < I:
                m_x = o_c < I
                o_h = o_c // V
                b_dt = tl.load(p_dt + o_h, mask=m_x, other=0.0).to(tl.float32)
                b_delta = _softplus(b_dt + tl.load(dt_bias + o_h, mask=m_x, other=0.0))
                tl.store(v + i_n * I + o_c, (b_y.to(tl.float32) * b_delta).to(v.dtype.element_ty), mask=m_x)
        else:
            i_h = i_b - NC
            b_delta = _softplus(tl.load(p_dt + i_h).to(tl.float32) + tl.load(dt_bias + i_h))
            tl.store(g + i_n * H + i_h, -tl.exp(tl.load(A_log + i_h)) * b_delta)
            o_l = tl.arange(0, BL)
            m_l = o_l < LV
            p_lam = lam + (i_n * H + i_h) * LV + o_l
            if LAMBDA == "none":
                tl.store(p_lam, tl.full([BL], 1.0, dtype=tl.float32), mask=m_l)
            else:
                b_dl = tl.load(p_dt + H + i_h * LV + o_l, mask=m_l, other=0.0).to(tl.float32)
                if LAMBDA == "linear":
                    b_a = tl.load(lam_L + i_h * LV + o_l, mask=m_l, other=0.0) * b_dl
                else:
                    o_j = tl.arange(0, BJ)
                    m_j = o_j < HID
                    m_jl = m_j[:, None] & m_l[None, :]
                    b_w1 = tl.load(fc1_w + o_j[:, None] * LV + o_l[None, :], mask=m_jl, other=0.0)  # (BJ, BL)
                    b_h = tl.sum(b_w1 * b_dl[None, :], axis=1) + tl.load(fc1_b + o_j, mask=m_j, other=0.0)
                    b_h = b_h * 0.5 * (1.0 + tl.math.erf(b_h * 0.7071067811865476))  # exact GELU
                    b_w2 = tl.load(fc2_w + o_l[None, :] * HID + o_j[:, None], mask=m_jl, other=0.0)  # fc2ᵀ
                    b_a = tl.sum(b_w2 * b_h[:, None], axis=0) + tl.load(fc2_b + o_l, mask=m_l, other=0.0)
                tl.store(p_lam, _softplus(b_a), mask=m_l)

    def mixer_decode_inputs_triton(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                                   conv_weight: torch.Tensor, conv_bias: torch.Tensor | None,
                                   dt_bias: torch.Tensor, A_log: torch.Tensor, *, intermediate_size: int,
                                   n_groups: int, state_size: int, num_heads: int, head_dim: int,
                                   lambda_levels: int, lambda_mode: str, lambda_L: torch.Tensor | None = None,
                                   fc1_w: torch.Tensor | None = None, fc1_b: torch.Tensor | None = None,
                                   fc2_w: torch.Tensor | None = None, fc2_b: torch.Tensor | None = None,
                                   block_c: int = 256) -> Outputs:
        """Same contract as ``mixer_decode_inputs_ref``; ``block_c``: conv channels per program."""
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
            HAS_BIAS=conv_bias is not None, num_warps=4 if BC >= 512 else 2,
        )
        return xbc, v, g, lam

    return mixer_decode_inputs_triton


def mixer_decode_inputs(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                        conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                        A_log: torch.Tensor, *, intermediate_size: int, n_groups: int, state_size: int,
                        num_heads: int, head_dim: int, lambda_levels: int, lambda_mode: str,
                        lambda_L: torch.Tensor | None = None, fc1_w: torch.Tensor | None = None,
                        fc1_b: torch.Tensor | None = None, fc2_w: torch.Tensor | None = None,
                        fc2_b: torch.Tensor | None = None) -> Outputs:
    """Triton on CUDA tensors, else the reference. See ``mixer_decode_inputs_ref`` for shapes."""
    impl = (_triton() if proj.is_cuda else None) or mixer_decode_inputs_ref
    return impl(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log,
                intermediate_size=intermediate_size, n_groups=n_groups, state_size=state_size,
                num_heads=num_heads, head_dim=head_dim, lambda_levels=lambda_levels, lambda_mode=lambda_mode,
                lambda_L=lambda_L, fc1_w=fc1_w, fc1_b=fc1_b, fc2_w=fc2_w, fc2_b=fc2_b)

