"""The Triton side of kernels/pdl.py: an L2 prefetch for kernels that launch with PDL."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the lines at ptrs: no register written, nothing waited for, never a fault that matters
    (a hint). Used before ``gdc_wait`` on data the previous kernel does not write."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)
