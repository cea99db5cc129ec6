"""The mixer's inputs to the Fenwick kernels in PyTorch: conv, Δ, g and λ, for decode and prefill.

Everything of the mixer between ``in_proj`` and the attention kernel: the depthwise causal conv over
each slot's saved conv state and the new inputs (the conv state is updated in place), SiLU,
Δ = softplus(dt + dt_bias), g = -exp(A_log) Δ, v = x Δ and λ (linear, MLP or none).
``mixer_decode_inputs_ref`` (one token per row) and ``mixer_prefill_inputs_ref`` (sequences packed along
the rows) are the specification of ``mixer_triton.py`` and the CPU path: they follow the mixer's ops
and roundings exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LAMBDA_MODES = ("linear", "mlp", "none")


Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def check_mixer_inputs(proj: torch.Tensor, conv_pool: torch.Tensor, slots: torch.Tensor,
                       conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
                       A_log: torch.Tensor, I: int, G: int, K: int, H: int, V: int, Lv: int, mode: str,
                       lambda_L: torch.Tensor | None, fc: tuple[torch.Tensor | None, ...],
                       N: int | None = None) -> tuple[int, int]:
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


def check_varlen(proj: torch.Tensor, cu_seqlens: torch.Tensor) -> int:
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
    D, _ = check_mixer_inputs(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G,
                              K, H, V, Lv, lambda_mode, lambda_L, fc)
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
    """The prefill inputs of N sequences packed along the rows; writes their new conv states in place.

    Each row is ``mixer_decode_inputs_ref`` of one token, its conv state made of the W - 1 inputs before
    it in its own sequence: earlier rows of the sequence, then (for its first W - 1 tokens) the saved
    window. As in ``LogLinearMamba2Mixer.prefill``, saved and new inputs meet in the conv in the model
    dtype, and the new conv state (the last W - 1 inputs of [saved conv state; new inputs]) is stored in
    conv_pool's dtype. Shapes and λ as in ``mixer_decode_inputs_ref``, with T = T_total:

    Args:
        proj: [T, I + D + H + H * Lv] in_proj output of the N sequences, packed along the rows.
        cu_seqlens: [N + 1] int32 or int64 on proj's device, cumulative lengths from 0 to T; every
            sequence has at least one row (not checked: that would synchronise).
        conv_pool: [P, D, W - 1]; its rows ``slots`` are read as the sequences' saved conv states, then
            replaced by their new conv states. slots: [N] int, distinct rows of conv_pool.
    Returns:
        xBC: [T, D] model dtype; v: [T, H, V] model dtype; g: [T, H] float32; lam: [T, H, Lv] float32.
    """
    I, G, K, H, V, Lv = intermediate_size, n_groups, state_size, num_heads, head_dim, lambda_levels
    fc = (fc1_w, fc1_b, fc2_w, fc2_b)
    N = check_varlen(proj, cu_seqlens)
    D, W = check_mixer_inputs(proj, conv_pool, slots, conv_weight, conv_bias, dt_bias, A_log, I, G,
                              K, H, V, Lv, lambda_mode, lambda_L, fc, N)
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
    """Rows of ext = [N saved conv states of W - 1 rows each; T packed inputs] that hold packed row
    ``pos`` of sequence ``seq`` (seq: [R], pos: [R, S]); rows before the sequence's start fall in its
    saved conv state."""
    N = cu.numel() - 1
    rel = pos - cu[seq][:, None]  # (R, S) position within the sequence, negative in the saved conv state
    return torch.where(rel >= 0, N * (W - 1) + pos, seq[:, None] * (W - 1) + (W - 1) + rel)
