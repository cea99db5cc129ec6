"""The Triton side of kernels/pdl.py: the wait every PDL kernel makes, and an L2 prefetch for before it."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the lines at ptrs: no register written, nothing waited for, never a fault that matters
    (a hint). Used before ``gdc_wait`` on data the previous kernel does not write."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; // $0", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def wait_then_release(USE_PDL: tl.constexpr):
    """With USE_PDL: wait until the previous kernel has finished (its writes are visible after this), then
    let the next kernel launch. Reads of the previous kernel's output go after this call; reads of data
    written two or more launches back may go before it. Without PDL: nothing."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
