"""Differentiable log-linear attention for training.

The serving kernels (`kernels.chunk_log_linear_attn`) are forward-only prefill paths; training needs
gradients. ``quadratic_log_linear_attn`` is the parallel form of DESIGN §1 written so that autograd is
cheap: the per-pair level scale ``λ[t, level(t, s)]`` is a matmul of λ with a constant one-hot level
table (no [B, H, T, T] int64 gather), decays are taken in fp32, and the two contractions run in the
autocast dtype. Memory is O(B·H·T²): fine for T ≤ 1024 on a GPU, and for the tiny CPU runs in the tests.
``chunked`` (tools/chunk_attn.py) is the O(T·C) chunked form for longer training sequences.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from fenwick_llm.kernels.state import level_matrix
from fenwick_llm.tools.chunk_attn import chunked_log_linear_attn

ATTENTION_CHOICES = ("quadratic", "chunked", "naive", "kernel")


@functools.lru_cache(maxsize=16)
def _level_onehot(T: int, L: int, device: torch.device) -> torch.Tensor:
    """[T, L, T] float32: 1 where level(t, s) == l and s <= t."""
    pos = torch.arange(T, device=device)
    lvl = level_matrix(pos[:, None], pos[None, :])  # (T, T)
    causal = pos[:, None] >= pos[None, :]
    if T > 0 and int(lvl[causal].max()) >= L:
        raise ValueError(f"T={T} needs {int(lvl[causal].max()) + 1} levels, level_scales has {L}")
    onehot = torch.nn.functional.one_hot(lvl.clamp(max=L - 1), L).float() * causal[..., None]  # (T, S, L)
    return onehot.permute(0, 2, 1).contiguous()  # (T, L, S)


def quadratic_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                              level_scales: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Same contract as ``kernels.naive.log_linear_attn``, differentiable and fast under autocast.

    Args:
        q, k: [B, T, G, K]; v: [B, T, H, V]; g: [B, T, H] log-decay (<= 0);
        level_scales: [B, T, H, L]; scale: defaults to K ** -0.5.
    Returns:
        o: [B, T, H, V] in v's dtype.
    """
    B, T, G, K = q.shape
    H, L = level_scales.shape[-2:]
    rep = H // G
    scale = K ** -0.5 if scale is None else scale
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    onehot = _level_onehot(T, L, q.device).to(dt)  # (T, L, S)
    autocast = torch.is_autocast_enabled(q.device.type)
    with torch.autocast(q.device.type, enabled=False):  # λ and the decays stay in full precision
        lam = torch.einsum("bhtl,tls->bhts", level_scales.to(dt).transpose(1, 2), onehot)  # (B, H, T, S)
    Gc = g.to(dt).cumsum(1).transpose(1, 2)  # (B, H, T)
    causal = onehot.sum(1) > 0  # (T, S)
    decay = (Gc[..., :, None] - Gc[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, T, S)
    scores = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)  # (B, G, T, S)
    w = (scores[:, :, None] * (lam * decay).reshape(B, G, rep, T, T)).reshape(B, H, T, T)
    o = (w if autocast else w.to(v.dtype)) @ v.transpose(1, 2)  # (B, H, T, V)
    return (o.transpose(1, 2) * scale).to(v.dtype)


def kernel_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                           level_scales: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The serving prefill op (``kernels.chunk_log_linear_attn``); trains only if it has a backward."""
    from fenwick_llm import kernels

    return kernels.chunk_log_linear_attn(q, k, v, g, level_scales, scale=scale)[0]


def naive_log_linear_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                          level_scales: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    from fenwick_llm.kernels import naive

    return naive.log_linear_attn(q, k, v, g, level_scales, scale=scale)


def get_attention(name: str):
    """The training attention by name: "quadratic" (default), "chunked" (O(T·C) memory, for long
    sequences), "naive" (the fp32 reference) or "kernel"."""
    table = {"quadratic": quadratic_log_linear_attn, "chunked": chunked_log_linear_attn,
             "naive": naive_log_linear_attn, "kernel": kernel_log_linear_attn}
    if name not in table:
        raise ValueError(f"unknown training attention {name!r}; choose from {ATTENTION_CHOICES}")
    return table[name]


@contextlib.contextmanager
def training_attention(name: str) -> Iterator[None]:
    """Route the model's full-sequence attention through the training attention ``name`` while inside.

    The mixer calls ``kernels.chunk_log_linear_attn``; calls without state or packing (the full-sequence
    ``forward``) go to the training op, the others (serving prefill) keep the kernel. Restored on exit,
    so an engine built afterwards in the same process serves with the real kernels.
    """
    from fenwick_llm import kernels

    attn = get_attention(name)
    original = kernels.chunk_log_linear_attn
    if name == "kernel":
        yield
        return

    def routed(q, k, v, g, level_scales, *, scale=None, initial_state=None, output_final_state=False,
               cu_seqlens=None):
        if initial_state is None and not output_final_state and cu_seqlens is None:
            return attn(q, k, v, g, level_scales, scale=scale), None
        return original(q, k, v, g, level_scales, scale=scale, initial_state=initial_state,
                        output_final_state=output_final_state, cu_seqlens=cu_seqlens)

    kernels.chunk_log_linear_attn = routed
    try:
        yield
    finally:
        kernels.chunk_log_linear_attn = original
