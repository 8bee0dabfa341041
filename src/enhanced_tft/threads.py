"""The number of CPU threads torch should use: the CPUs this process may really run on.

torch's default is the machine's core count, which inside a container or under `taskset` can exceed the
CPUs this process gets; OpenMP threads beyond those spin against each other and slow every op down.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs of this process: its affinity mask, capped by a cgroup v2/v1 CPU quota where one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cpus = min(cpus, max(1, int(quota + 0.5)))
    return max(1, cpus)


def _cgroup_quota() -> float | None:
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        if quota > 0 and period > 0:
            return quota / period
    except (OSError, ValueError):
        pass
    return None


def configure_threads(requested: int | None = None) -> int:
    """Set torch's intra-op threads to `requested`, else to OMP_NUM_THREADS where the user set it, else to the
    available CPUs; returns the number set."""
    import torch

    from_env = os.environ.get("OMP_NUM_THREADS", "").strip()
    threads = requested or (int(from_env) if from_env.isdigit() and int(from_env) > 0 else available_cpus())
    if torch.get_num_threads() != threads:
        log.debug("torch threads %d -> %d", torch.get_num_threads(), threads)
        torch.set_num_threads(threads)
    return threads
