"""engine/cpus.py: the CPUs the engine core may use, read from fake cgroup v1 and v2 trees, and the thread
count `fenwick serve`'s engine core sets from it (engine/startup.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from fenwick_llm.engine import cpus
from fenwick_llm.engine.startup import set_cpu_threads


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v2_tree(
    tmp_path: Path, own: str | None, root: str | None, cgroup: str = "/user.slice/a"
) -> tuple[Path, Path]:
    root_dir, proc = tmp_path / "cg", tmp_path / "proc-cgroup"
    write(proc, f"0::{cgroup}\n")
    root_dir.mkdir()
    if own is not None:
        write(root_dir / cgroup.lstrip("/") / "cpu.max", own)
    if root is not None:
        write(root_dir / "cpu.max", root)
    return root_dir, proc


def v1_tree(tmp_path: Path, quota: int, period: int = 100000, own: bool = False) -> tuple[Path, Path]:
    """A container's view: /proc/self/cgroup names the host's path, the mount's root holds the quota (or,
    with own=True, the path does)."""
    root_dir, proc = tmp_path / "cg", tmp_path / "proc-cgroup"
    write(proc, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n")
    folder = root_dir / "cpu,cpuacct" / ("docker/abc" if own else "")
    write(folder / "cpu.cfs_quota_us", f"{quota}\n")
    write(folder / "cpu.cfs_period_us", f"{period}\n")
    return root_dir, proc


@pytest.mark.parametrize(("text", "limit"), [("150000 100000\n", 1.5), ("max 100000\n", None),
                                             ("50000 100000", 0.5)])
def test_cgroup_v2_quota(tmp_path: Path, text: str, limit: float | None) -> None:
    assert cpus.cgroup_cpu_limit(*v2_tree(tmp_path, own=text, root=None)) == limit


def test_cgroup_v2_in_a_namespace_reads_the_root(tmp_path: Path) -> None:
    """Inside a container's cgroup namespace /proc/self/cgroup says "0::/": the quota is the root's."""
    assert cpus.cgroup_cpu_limit(*v2_tree(tmp_path, own=None, root="300000 100000", cgroup="/")) == 3.0


def test_cgroup_v2_own_folder_comes_before_the_root(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_limit(*v2_tree(tmp_path, own="100000 100000", root="800000 100000")) == 1.0


@pytest.mark.parametrize("own", [False, True])
def test_cgroup_v1_quota(tmp_path: Path, own: bool) -> None:
    assert cpus.cgroup_cpu_limit(*v1_tree(tmp_path, 250000, own=own)) == 2.5
    assert cpus.cgroup_cpu_limit(*v1_tree(tmp_path, -1, own=own)) is None


def test_no_cgroup_files_means_no_limit(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_limit(tmp_path / "none", tmp_path / "no-proc") is None


def test_garbage_is_no_limit(tmp_path: Path) -> None:
    assert cpus.cgroup_cpu_limit(*v2_tree(tmp_path, own="lots of cpus", root=None)) is None


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    assert cpus.usable_cpus(tmp_path / "none", tmp_path / "no-proc") == affinity
    assert cpus.usable_cpus(*v2_tree(tmp_path / "a", own="50000 100000", root=None)) == 1
    assert cpus.usable_cpus(*v2_tree(tmp_path / "b", own="100001 100000", root=None)) == min(affinity, 2)
    assert cpus.usable_cpus(*v2_tree(tmp_path / "c", own="6400000 100000", root=None)) == affinity


def test_set_cpu_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        assert set_cpu_threads(1) == 1 == torch.get_num_threads()
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 1)
        torch.set_num_threads(2)
        assert set_cpu_threads(None) == 1 == torch.get_num_threads()  # capped by the quota
        monkeypatch.setattr(cpus, "usable_cpus", lambda: 64)
        torch.set_num_threads(2)
        assert set_cpu_threads(None) == 2  # never above torch's own count
        with pytest.raises(ValueError, match="at least 1"):
            set_cpu_threads(0)
    finally:
        torch.set_num_threads(before)
