"""Token bitmasks on logits in PyTorch: the specification and CPU path of ``bitmask_triton.py``."""

from __future__ import annotations

import torch


def apply_token_bitmask_ref(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set to -inf, in place, the logits of the tokens a bitmask row does not allow.

    Args:
        logits: [N, V] any float dtype, written in place.
        bitmask: [R, W] int32 with 32 * W >= V: bit v % 32 of word v // 32 of row r allows token v
            (llguidance's and xgrammar's layout); tokens past 32 * W do not exist.
        rows: [R] int64: the logits row each bitmask row applies to (distinct); other rows are untouched.
    """
    n_vocab = logits.shape[1]
    assert bitmask.dtype == torch.int32 and 32 * bitmask.shape[1] >= n_vocab
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).bool().flatten(1)[:, :n_vocab]  # (R, V)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
