"""Process-wide side effects, applied once at the edge (``fenwick serve``, the ``LLM`` constructor) and
never in the constructors that tests build many times."""

from __future__ import annotations

import atexit
import functools
import gc
import logging


@functools.cache
def _unfreeze_at_exit() -> None:
    atexit.register(gc.unfreeze)  # the final collection at exit sees them again (once per process)


def freeze_heap() -> None:
    """Collect once, then keep every object alive now out of later collections (gc.freeze): a full
    collection otherwise walks the whole start-up heap (torch, the model) and stalls the step it lands in
    (bench/gc_pause.py measures it)."""
    gc.collect()
    gc.freeze()
    _unfreeze_at_exit()


LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Each process of `fenwick serve` logs to stderr, named (fenwick-core, fenwick-api-0, ...)."""
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT)


def set_cpu_threads(requested: int | None) -> int:
    """torch's intra-op threads for this process: `requested`, or None for torch's own count capped by the
    CPUs this process may use (engine/cpus.py: its affinity and cgroup quota). The count set."""
    import torch

    from .cpus import usable_cpus

    threads = requested if requested is not None else min(torch.get_num_threads(), usable_cpus())
    if threads < 1:
        raise ValueError(f"cpu threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    return threads
