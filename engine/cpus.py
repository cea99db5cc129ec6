"""How many CPUs this process may really use: its affinity mask, capped by its cgroup's CPU quota.

torch sizes its intra-op thread pool from the machine's cores, not from the quota a container runs under
(`docker run --cpus`, a Kubernetes CPU limit): a pod limited to 2 CPUs on a 64-core node would start 64
OpenMP threads that spin at each barrier while the quota throttles them, and every step slows down many
times over. The engine core sizes its pool from usable_cpus() instead (engine/startup.py).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _quota_v2(text: str) -> float | None:
    """cpu.max: "<quota> <period>" in microseconds, or "max <period>" for no limit."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    quota, period = int(fields[0]), int(fields[1])
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_text: str, period_text: str) -> float | None:
    """cpu.cfs_quota_us (-1 for no limit) over cpu.cfs_period_us."""
    quota, period = int(quota_text), int(period_text)
    return quota / period if quota > 0 and period > 0 else None


def _candidates(root: Path, proc_cgroup: Path) -> list[tuple[Path, str]]:
    """(folder, "v1" or "v2") where this process's CPU quota may be written: its own cgroup's folder as
    /proc/self/cgroup names it, then the mount's root (inside a container's cgroup namespace the process's
    cgroup is the root, while /proc/self/cgroup may still name the host's path)."""
    found: list[tuple[Path, str]] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        relative = path.lstrip("/")
        if controllers == "":  # cgroup v2's single hierarchy
            found.append((root / relative, "v2"))
        elif "cpu" in controllers.split(","):
            mount = root / controllers
            if not mount.is_dir():
                mount = root / "cpu"
            found += [(mount / relative, "v1"), (mount, "v1")]
    found += [(root, "v2"), (root / "cpu", "v1")]
    return found


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 for `--cpus 1.5`), or None where none is set
    or none can be read."""
    for folder, version in _candidates(root, proc_cgroup):
        try:
            if version == "v2":
                limit = _quota_v2((folder / "cpu.max").read_text())
            else:
                limit = _quota_v1((folder / "cpu.cfs_quota_us").read_text(),
                                  (folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return limit
    return None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs in this process's affinity mask, capped by its cgroup quota rounded up; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root, proc_cgroup)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)
