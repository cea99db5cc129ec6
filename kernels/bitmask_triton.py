"""Token bitmasks on logits in Triton: one launch for a step's constrained rows (``bitmask_torch.py`` is
the reference, same signature). Never synchronises with the host."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BV = 2048  # logits per program


@triton.jit
def _apply_token_bitmask_kernel(logits, bitmask, rows, s_ln, s_bn, V, BV: tl.constexpr):
    i_r, i_v = tl.program_id(0), tl.program_id(1)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    b_row = tl.load(rows + i_r).to(tl.int64)
    b_w = tl.load(bitmask + i_r * s_bn + o_v // 32, mask=m_v, other=-1)
    b_drop = ((b_w >> (o_v % 32)) & 1) == 0
    b_inf = tl.full([BV], float("-inf"), logits.dtype.element_ty)
    tl.store(logits + b_row * s_ln + o_v, b_inf, mask=m_v & b_drop)


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Shapes and layout in ``bitmask_torch.apply_token_bitmask_ref``."""
    n_rows, n_vocab = bitmask.shape[0], logits.shape[1]
    assert bitmask.dtype == torch.int32 and 32 * bitmask.shape[1] >= n_vocab
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1
    if n_rows == 0:
        return
    grid = (n_rows, triton.cdiv(n_vocab, BV))
    _apply_token_bitmask_kernel[grid](logits, bitmask, rows, logits.stride(0), bitmask.stride(0), n_vocab,
                                      BV=BV)
