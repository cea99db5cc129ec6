"""How long Python's full (generation-2) garbage collections take inside ``LLM.generate``, with the
start-up heap frozen (what the ``LLM`` constructor and ``fenwick serve`` do) or not.

    python bench/gc_pause.py            # tiny random model on this machine's device
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch

from engine import TINY, prompts, write_model
from fenwick_llm import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    pauses: list[float] = []
    started: list[float] = []

    def watch(phase: str, info: dict) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses.append(time.perf_counter() - started.pop())

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model(Path(tmp) / "m", TINY, "mlp", torch.float32, 0)
        for freeze in (False, True):
            llm = LLM(str(model_dir), max_num_seqs=a.batch, max_model_len=640)  # freezes the heap
            if not freeze:
                gc.unfreeze()
            full = time.perf_counter()
            gc.collect()
            full = time.perf_counter() - full
            gc.callbacks.append(watch)
            params = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
            for i in range(a.runs):
                llm.generate(prompts(a.batch, 512, TINY["vocab_size"], i), params)
            gc.callbacks.remove(watch)
            seen = ", ".join(f"{p * 1e3:.1f}" for p in pauses) or "-"
            print(f"frozen={freeze}: {len(gc.get_objects())} tracked objects, gc.collect() "
                  f"{full * 1e3:.1f} ms; {len(pauses)} full collections in {a.runs} generate calls of "
                  f"batch {a.batch}: {seen} ms")
            pauses.clear()
            del llm
    gc.unfreeze()


if __name__ == "__main__":
    main()
