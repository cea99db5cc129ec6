"""Reference forms of log-linear attention: the specification, and the CPU path for tests.

``log_linear_attn`` is the quadratic (parallel) form, ``recurrent_log_linear_attn`` the token-by-token
Fenwick recurrence with the signature of ``chunk_log_linear_attn``, and ``fused_recurrent_step_ref``
one decode token for a pool of sequences with the signature of ``fused_recurrent_step``.
"""

from __future__ import annotations

import torch

from .state import (
    FenwickState,
    check_level_decay,
    check_shapes,
    ctz,
    level_matrix,
    max_positions,
    true_levels,
)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                    level_scales: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Quadratic form: o_t = scale * sum_{s<=t} lam[t, level(t,s)] exp(G_t - G_s) (q_t . k_s) v_s.

    Args:
        q, k: [B, T, G, K]; v: [B, T, H, V]; g: [B, T, H] log-decay (<= 0);
        level_scales: [B, T, H, L] (lambda, positive); scale: defaults to K ** -0.5.
    Returns:
        o: [B, T, H, V] in v's dtype.
    """
    rep, L = check_shapes(q, k, v, g, level_scales)
    B, T, _, K = q.shape
    scale = K ** -0.5 if scale is None else scale
    dt = _compute_dtype(q)
    pos = torch.arange(T, device=q.device)
    lvl = level_matrix(pos[:, None], pos[None, :])  # (T, T)
    causal = pos[:, None] >= pos[None, :]
    if T > 0 and int(lvl[causal].max()) >= L:
        raise ValueError(f"T={T} needs {int(lvl[causal].max()) + 1} levels, level_scales has {L}")
    qh = q.to(dt).repeat_interleave(rep, dim=2)  # (B, T, H, K)
    kh = k.to(dt).repeat_interleave(rep, dim=2)
    Gc = g.to(dt).cumsum(1).transpose(1, 2)  # (B, H, T)
    decay = (Gc[..., :, None] - Gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, T, T)
    lam = level_scales.to(dt).permute(0, 2, 1, 3)  # (B, H, T, L)
    H = lam.shape[1]
    lam_ts = torch.gather(lam, 3, lvl.clamp(max=L - 1).expand(B, H, T, T))  # (B, H, T, T)
    scores = torch.einsum("bthk,bshk->bhts", qh, kh)
    o = torch.einsum("bhts,bshv->bthv", scores * lam_ts * decay, v.to(dt))
    return (o * scale).to(v.dtype)


def recurrent_step(levels: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   g: torch.Tensor, level_scales: torch.Tensor, positions: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Absorb one token per sequence at its own position; pure function.

    Args:
        levels: [N, L, H, K, V] in the compute dtype; q, k: [N, G, K]; v: [N, H, V]; g: [N, H];
        level_scales: [N, H, L]; positions: [N] int64, index of this token.
    Returns:
        (o [N, H, V] in the compute dtype, new levels [N, L, H, K, V]).
    """
    N, L, H = levels.shape[:3]
    dt = levels.dtype
    rep = H // q.shape[1]
    qh = q.to(dt).repeat_interleave(rep, dim=1)  # (N, H, K)
    kh = k.to(dt).repeat_interleave(rep, dim=1)
    z = ctz(positions)  # (N,), -1 at position 0
    lidx = torch.arange(L, device=levels.device)
    merge = (lidx[None, :] <= z[:, None]).to(dt)  # (N, L): levels folded into z + 1
    carry = torch.einsum("nl,nlhkv->nhkv", merge, levels)
    target = torch.nn.functional.one_hot((z + 1).clamp(max=L - 1), L).to(dt)  # (N, L)
    new = levels * (1 - merge)[:, :, None, None, None] + target[:, :, None, None, None] * carry[:, None]
    decay = torch.exp(g.to(dt))[:, None, :, None, None]  # (N, 1, H, 1, 1)
    new = torch.cat([(kh[..., :, None] * v.to(dt)[..., None, :])[:, None], new[:, 1:] * decay], dim=1)
    o = torch.einsum("nhk,nlhkv,nhl->nhv", qh, new, level_scales.to(dt)) * scale
    return o, new


def _check_positions(end: torch.Tensor, num_levels: int) -> None:
    if end.numel() and int(end.max()) > max_positions(num_levels):
        raise ValueError(
            f"sequence reaches {int(end.max())} tokens but {num_levels} levels hold at most "
            f"{max_positions(num_levels)}"
        )


def _recurrent_dense(q, k, v, g, level_scales, scale, initial_state):
    B, T, _, K = q.shape
    H, V = v.shape[-2:]
    L = level_scales.shape[-1]
    dt = _compute_dtype(q)
    if initial_state is None:
        levels = torch.zeros(B, L, H, K, V, dtype=dt, device=q.device)
        start = torch.zeros(B, dtype=torch.int64, device=q.device)
    else:
        if initial_state.levels.shape != (B, L, H, K, V):
            raise ValueError(
                f"initial_state.levels must be {(B, L, H, K, V)}, got {tuple(initial_state.levels.shape)}"
            )
        levels = initial_state.levels.to(dt)
        start = initial_state.positions.to(q.device, torch.int64)
    _check_positions(start + T, L)
    o = torch.empty(B, T, H, V, dtype=dt, device=q.device)
    for t in range(T):
        o[:, t], levels = recurrent_step(levels, q[:, t], k[:, t], v[:, t], g[:, t], level_scales[:, t],
                                         start + t, scale)
    return o, FenwickState(levels, start + T)


def recurrent_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                              level_scales: torch.Tensor, *, scale: float | None = None,
                              initial_state: FenwickState | None = None, output_final_state: bool = False,
                              cu_seqlens: torch.Tensor | None = None
                              ) -> tuple[torch.Tensor, FenwickState | None]:
    """Token-by-token recurrence with the signature of ``chunk_log_linear_attn``.

    Args:
        q, k: [B, T, G, K]; v: [B, T, H, V]; g: [B, T, H]; level_scales: [B, T, H, L].
        initial_state: FenwickState with N = B (or N = len(cu_seqlens) - 1) sequences.
        cu_seqlens: [N + 1] int cumulative lengths of the sequences packed along T (B must be 1).
    Returns:
        o: [B, T, H, V] in v's dtype; final state (levels in the compute dtype) if asked for.
    """
    check_shapes(q, k, v, g, level_scales)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        o, state = _recurrent_dense(q, k, v, g, level_scales, scale, initial_state)
        return o.to(v.dtype), (state if output_final_state else None)
    if q.shape[0] != 1:
        raise ValueError(f"cu_seqlens needs B == 1, got B = {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    outs, levels, positions = [], [], []
    for n in range(len(bounds) - 1):
        a, b = bounds[n], bounds[n + 1]
        init = None if initial_state is None else FenwickState(
            initial_state.levels[n:n + 1], initial_state.positions[n:n + 1])
        o, st = _recurrent_dense(q[:, a:b], k[:, a:b], v[:, a:b], g[:, a:b], level_scales[:, a:b], scale,
                                 init)
        outs.append(o)
        levels.append(st.levels)
        positions.append(st.positions)
    o = torch.cat(outs, dim=1).to(v.dtype)
    if not output_final_state:
        return o, None
    return o, FenwickState(torch.cat(levels), torch.cat(positions))


def fused_recurrent_step_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                             level_scales: torch.Tensor, levels: torch.Tensor, slots: torch.Tensor,
                             positions: torch.Tensor, scale: float | None = None, *,
                             level_decay: torch.Tensor | None = None) -> torch.Tensor:
    """One decode token for N sequences held in a pool; updates ``levels[slots]`` in place.

    Args:
        q, k: [N, G, K]; v: [N, H, V]; g: [N, H]; level_scales: [N, H, L];
        levels: [P, L, H, K, V] state pool; slots: [N] int, distinct pool rows;
        positions: [N] int, index of this token in each sequence (tokens absorbed before it).
        level_decay: [P, 2, L, H] float32, or None. With it the pool defers the decay (DESIGN §3): at
            position t, S[l] = levels[slot, l] * exp(level_decay[slot, t % 2, l]) (-inf: empty), and a
            step reads buffer t % 2 and writes buffer (t + 1) % 2 (``kernels.state.true_levels``). Fast
            paths may store any levels and log-decays that mean the same S; this reference writes S
            itself with log-decay 0.
    Returns:
        o: [N, H, V] in v's dtype.
    """
    check_shapes(q, k, v, g, level_scales)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    slots = slots.long()
    positions = positions.long()
    _check_positions(positions + 1, levels.shape[1])
    dt = _compute_dtype(q) if levels.dtype != torch.float64 else torch.float64
    if level_decay is None:
        cur = levels[slots].to(dt)
    else:
        check_level_decay(level_decay, levels)
        cur = true_levels(levels, level_decay, slots, positions, dt)
    o, new = recurrent_step(cur, q, k, v, g, level_scales, positions, scale)
    levels[slots] = new.to(levels.dtype)
    if level_decay is not None:
        level_decay[slots, (positions + 1) % 2] = 0.0
    return o.to(v.dtype)
