"""Decode pools with deferred decay for the step tests: the same levels S stored as blocks and log-decays."""

from __future__ import annotations

import torch


def deferred_pool(levels: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, num_slots: int,
                  dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool [P, L, H, K, V] in ``dtype`` and its level_decay [P, 2, L, H] holding ``levels``
    [N, L, H, K, V] (each sequence's S at its position) in ``slots``, stored unevenly on purpose: a live
    level's block is S * exp(-a) with a random a in [-2, 0], an empty level's block is random junk with
    a = -inf, the other buffer of level_decay and every other slot are NaN."""
    device = levels.device
    levels, positions, slots = levels.cpu(), positions.cpu(), slots.cpu()
    gen = torch.Generator().manual_seed(seed)
    N, L, H = levels.shape[:3]
    live = levels.abs().flatten(3).sum(-1) > 0  # (N, L, H): S is zero only where the level is empty
    a = torch.where(live, -2 * torch.rand(N, L, H, generator=gen, dtype=torch.float64), float("-inf"))
    junk = torch.randn(levels.shape, generator=gen, dtype=torch.float64)
    stored = torch.where(live[..., None, None], levels.double() * torch.exp(-a)[..., None, None], junk)
    pool = torch.full((num_slots, *levels.shape[1:]), float("nan"), dtype=dtype)
    pool[slots] = stored.to(dtype)
    decay = torch.full((num_slots, 2, L, H), float("nan"), dtype=torch.float32 if dtype != torch.float64
                       else torch.float64)
    decay[slots, positions % 2] = a.to(decay.dtype)
    return pool.to(device), decay.to(device)
