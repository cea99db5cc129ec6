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
    # bytes of little-endian words are in token order: byte k of word j holds tokens 32j + 8k .. + 7
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmask.device)
    as_bytes = bitmask.contiguous().view(torch.uint8)  # (R, 4W)
    drop = ((as_bytes[:, :, None] >> shifts) & 1).flatten(1)[:, :n_vocab] == 0  # (R, V)
    sub = logits.index_select(0, rows)
    sub.masked_fill_(drop, float("-inf"))
    logits.index_copy_(0, rows, sub)
