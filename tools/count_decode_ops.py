"""Count the ATen ops (≈ device kernels) that one decode step runs per layer, on the CPU.

On a GPU the decode step at small batch is bound by the number of small kernels per layer, not by
weight reads; this script counts them without a GPU. Every op that reaches the dispatcher under a
``TorchDispatchMode`` is counted ("ops/layer"); "kernels/layer" leaves out the ops that only make a view
or allocate uninitialised memory, which launch no kernel on a device.
The log-linear step kernel (``kernels.fused_recurrent_step``, one Triton kernel on CUDA) is counted as
one op. Per-layer numbers are the difference between models of 2 and 1 layers.

    python -m tools.count_decode_ops [--dtype bfloat16] [--hidden 64] [--batch 1] [--verbose]
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from engine.model import LogLinearMamba2ForCausalLM
from engine.state import ModelState
from tests.tiny import randomize_, tiny_config

VIEW_OPS = {
    "view", "_unsafe_view", "unflatten", "flatten", "split", "split_with_sizes", "slice", "select",
    "transpose", "t", "permute", "unsqueeze", "squeeze", "expand", "alias", "detach", "as_strided",
    "unbind", "narrow", "reshape", "_reshape_alias", "lift_fresh",
}
ALLOC_OPS = {"empty", "empty_like", "empty_strided", "new_empty"}  # allocation (caching allocator), no kernel


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_step(mode: str, layers: int, dtype: torch.dtype, hidden: int, batch: int) -> Counter[str]:
    torch.manual_seed(0)
    model = LogLinearMamba2ForCausalLM(tiny_config(mode, hidden_size=hidden, num_hidden_layers=layers),
                                       dtype=dtype)
    randomize_(model)
    model.eval()
    state = ModelState.allocate(model.config, batch + 1, dtype=dtype)
    slots = torch.arange(1, batch + 1)
    ids = torch.arange(batch) + 5
    for _ in range(3):  # past position 0, so the step is a typical one
        model.decode(ids, state, slots)
    counter = OpCounter()
    step = kernels.fused_recurrent_step

    def counted_step(*args, **kwargs):  # the step kernel counts as one op (one Triton kernel on CUDA)
        counter.ops["<fused_recurrent_step>"] += 1
        counter.paused = True
        try:
            return step(*args, **kwargs)
        finally:
            counter.paused = False

    kernels.fused_recurrent_step = counted_step
    try:
        with counter:
            model.decode(ids, state, slots)
    finally:
        kernels.fused_recurrent_step = step
    return counter.ops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: both)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--modes", default="linear,mlp,none")
    ap.add_argument("--verbose", action="store_true", help="list the per-layer ops by name")
    args = ap.parse_args()
    dtypes = [getattr(torch, args.dtype)] if args.dtype else [torch.float32, torch.bfloat16]
    print(f"{'dtype':>9} {'lambda':>6} {'ops/layer':>9} {'kernels/layer':>13} {'other ops':>9}")
    for dtype in dtypes:
        for mode in args.modes.split(","):
            one = count_step(mode, 1, dtype, args.hidden, args.batch)
            two = count_step(mode, 2, dtype, args.hidden, args.batch)
            per_layer = two - one
            total = sum(per_layer.values())
            kern = sum(n for op, n in per_layer.items() if op not in VIEW_OPS | ALLOC_OPS)
            outside = sum(one.values()) - total
            print(f"{str(dtype).removeprefix('torch.'):>9} {mode:>6} {total:>9} {kern:>13} {outside:>9}")
            if args.verbose:
                for op, n in sorted(per_layer.items(), key=lambda kv: (-kv[1], kv[0])):
                    kind = "  (view)" if op in VIEW_OPS else "  (alloc)" if op in ALLOC_OPS else ""
                    print(f"{'':>18}{n:>4}  {op}{kind}")


if __name__ == "__main__":
    main()
