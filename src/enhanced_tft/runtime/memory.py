"""Memory figures for the log and summary (allocator, NVML, RSS), what counts as running out of memory, what
this process may still allocate, and release of memory between runs."""
from __future__ import annotations

import ctypes
import gc
import logging
import os
import resource
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from ..errors import OutOfMemoryGiveUp

log = logging.getLogger(__name__)

GIB = 2**30
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The CPU allocator's failure is a plain RuntimeError: "[enforce fail at alloc_cpu.cpp:...] ... DefaultCPUAllocator:
# can't allocate memory: you tried to allocate N bytes. Error code 12"; Windows builds say "not enough memory".
CPU_ALLOCATOR_FAILURES = ("DefaultCPUAllocator: can't allocate memory", "not enough memory")
# oneDNN (the CPU's LSTM and matmul kernels) checks a configuration when it makes a primitive descriptor ("could not
# create a primitive descriptor ..."); making the primitive from it then allocates its JIT code and scratchpad, which
# under a ulimit can fail before torch's allocator does. The same words also come from a CPU that oneDNN cannot
# serve, so they count as running out of memory only while the process is nearly out of it.
ONEDNN_PRIMITIVE_FAILURE = "could not create a primitive"
ONEDNN_PRESSURE_BYTES = 256 * 2**20   # a primitive's JIT code and scratchpad: tens of MiB at this model's sizes


def is_out_of_memory(err: BaseException) -> bool:
    """Whether `err` is an allocation failure that a smaller batch can avoid: a CUDA OOM, numpy's MemoryError, the
    CPU allocator's RuntimeError (under a ulimit, or on a machine without overcommit), or oneDNN failing to make a
    primitive while memory is nearly gone. Any other error is not memory and must propagate."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    if not isinstance(err, RuntimeError):
        return False
    text = str(err)
    if any(failure in text for failure in CPU_ALLOCATOR_FAILURES):
        return True
    return (text.strip() == ONEDNN_PRIMITIVE_FAILURE
            and available_process_memory_bytes().bytes < ONEDNN_PRESSURE_BYTES)


class AvailableMemory(NamedTuple):
    bytes: int
    source: str     # which limit is the smallest, for the log


def _first_int(path: Path) -> int | None:
    """The first number in a /proc or cgroup file; None where it is absent or says "max" (no limit)."""
    try:
        first = path.read_text().split()[0]
    except (OSError, IndexError):
        return None
    return int(first) if first.isdigit() else None


def _cgroup_headroom() -> list[AvailableMemory]:
    """Limit minus usage of this process's memory cgroup and each cgroup above it (v2, and v1's memory controller).

    /proc/self/cgroup names the process's cgroup; inside a container's cgroup namespace it is the mount's root.
    """
    paths = {}
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            hierarchy, controllers, path = line.split(":", 2)
            if hierarchy == "0" and not controllers:
                paths["v2"] = path
            elif "memory" in controllers.split(","):
                paths["v1"] = path
    except (OSError, ValueError):
        pass
    found = []
    for version, root, limit_name, usage_name in (("v2", CGROUP_ROOT, "memory.max", "memory.current"),
                                                  ("v1", CGROUP_ROOT / "memory", "memory.limit_in_bytes",
                                                   "memory.usage_in_bytes")):
        own = root / paths.get(version, "/").lstrip("/")
        for folder in [own, *own.parents]:
            limit, usage = _first_int(folder / limit_name), _first_int(folder / usage_name)
            if limit is not None and usage is not None:   # v1's "no limit" is 2**63 - 4096: never the smallest
                found.append(AvailableMemory(max(0, limit - usage), f"cgroup {folder / limit_name} minus usage"))
            if folder == root:
                break
    return found


def available_process_memory_bytes() -> AvailableMemory:
    """What this process may still allocate: the smallest of its cgroups' headroom, RLIMIT_AS and RLIMIT_DATA
    minus what it has mapped, and the machine's MemAvailable.

    A cgroup limit is enforced by the kernel's OOM killer (the process is killed, nothing to catch); a ulimit makes
    the allocator fail, which training survives by halving the micro-batch.
    """
    candidates = _cgroup_headroom()
    try:
        with open("/proc/self/statm") as handle:   # pages: size resident shared text lib data dt
            fields = [int(v) * os.sysconf("SC_PAGE_SIZE") for v in handle.read().split()]
        mapped = {"RLIMIT_AS": fields[0], "RLIMIT_DATA": fields[5]}
    except (OSError, ValueError, IndexError):
        mapped = {}
    for name, used in mapped.items():
        soft, _ = resource.getrlimit(getattr(resource, name))
        if soft != resource.RLIM_INFINITY:
            candidates.append(AvailableMemory(max(0, soft - used), f"{name} ulimit minus the process's mapped memory"))
    if _first_int(Path("/proc/sys/vm/overcommit_memory")) == 2:   # no overcommit: allocations fail at CommitLimit
        meminfo = _meminfo()
        if {"CommitLimit", "Committed_AS"} <= meminfo.keys():
            candidates.append(AvailableMemory(max(0, meminfo["CommitLimit"] - meminfo["Committed_AS"]),
                                              "CommitLimit minus Committed_AS (overcommit_memory=2)"))
    candidates.append(AvailableMemory(available_ram_bytes(), "MemAvailable of /proc/meminfo"))
    return min(candidates, key=lambda candidate: candidate.bytes)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def current_rss_bytes() -> int:
    """Resident set size now, from /proc where there is one (else the peak, the best figure available)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def _meminfo() -> dict[str, int]:
    """The sizes of /proc/meminfo ("MemAvailable:  123 kB"), in bytes; empty where there is none."""
    try:
        with open("/proc/meminfo") as handle:
            rows = [line.split() for line in handle]
        return {row[0].rstrip(":"): int(row[1]) * 1024 for row in rows if len(row) == 3 and row[2] == "kB"}
    except (OSError, ValueError):
        return {}


def available_ram_bytes() -> int:
    """MemAvailable of /proc/meminfo (what the machine can still give), or the total RAM elsewhere."""
    available = _meminfo().get("MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated tensor bytes on a GPU since the last reset; peak process RSS on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


def release_memory(device: torch.device) -> None:
    """Collect garbage (graphs, optimizer state) and hand cached GPU blocks back to the driver."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def release_after_oom(device: torch.device) -> None:
    """Free what a failed attempt held: collect its graph, then give the freed memory back to the system: the GPU
    allocator's cached blocks, or on the CPU the free top of glibc's heap, which it keeps for reuse (up to 512 MiB,
    threads.tune_host_allocator). Under a ulimit, that kept address space made the redone, halved window fail in
    oneDNN's own allocations (measured: a step that failed at 1536 samples could not be redone at 768 without it)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: nothing kept to give back
        pass


class OomBackoff:
    """A batch size that halves after each out-of-memory, down to one sample, then gives up with advice: one
    object for training's micro-batch, its evaluation chunks and the inference loop's batches.

    `give_up(what)` makes the OutOfMemoryGiveUp that says what to change; `announce(what, failed, size)` tells
    the log (default: "out of memory in WHAT: batch FAILED -> SIZE; redoing the batch")."""

    def __init__(self, size: int, device: torch.device, give_up: Callable[[str], OutOfMemoryGiveUp],
                 announce: Callable[[str, int, int], None] | None = None):
        self.size, self.device, self._give_up, self._announce = size, device, give_up, announce

    def halve(self, what: str) -> int:
        """Free what the failed attempt held, then halve the size (OutOfMemoryGiveUp when it already was one
        sample); returns the size that failed."""
        release_after_oom(self.device)
        if self.size <= 1:
            raise self._give_up(what)
        failed, self.size = self.size, self.size // 2
        if self._announce:
            self._announce(what, failed, self.size)
        else:
            log.warning("out of memory in %s: batch %d -> %d; redoing the batch", what, failed, self.size)
        return failed


def _nvml_handle(device: torch.device):
    """NVML handle of the GPU (nvidia-ml-py), or None where the library or driver is absent."""
    if device.type != "cuda":
        return None
    try:
        import pynvml
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:   # no nvidia-ml-py, or no driver: allocator figures still work
        return None


class MemoryMonitor:
    """Figures for one logging window; `window()` returns them and starts the next window."""

    def __init__(self, device: torch.device):
        self.device = device
        self._nvml = _nvml_handle(device)
        # windows reset the allocator's peak, so the epoch's peak is kept here
        self.epoch_peak = 0

    def start_epoch(self) -> None:
        self.epoch_peak = 0

    def peak_since_epoch_start(self) -> int:
        """Peak allocated bytes (CUDA) or peak RSS (CPU) since start_epoch(), across window resets."""
        return max(self.epoch_peak, peak_memory_bytes(self.device))

    def window(self) -> dict[str, int]:
        if self.device.type != "cuda":
            current = current_rss_bytes()   # read after the kernel's peak counter: never report peak < current
            return {"memory/rss_bytes": current, "memory/peak_rss_bytes": max(current, peak_rss_bytes())}
        stats = torch.cuda.memory_stats(self.device)
        window_peak = int(torch.cuda.max_memory_allocated(self.device))
        self.epoch_peak = max(self.epoch_peak, window_peak)
        figures = {
            "memory/peak_allocated_bytes": int(torch.cuda.max_memory_allocated(self.device)),
            "memory/peak_reserved_bytes": int(torch.cuda.max_memory_reserved(self.device)),
            "memory/alloc_retries": int(stats.get("num_alloc_retries", 0)),
            "memory/ooms": int(stats.get("num_ooms", 0)),
        }
        if self._nvml is not None:
            import pynvml
            info = pynvml.nvmlDeviceGetMemoryInfo(self._nvml)
            figures["memory/device_used_bytes"] = int(info.used)     # what nvidia-smi shows
            figures["memory/device_total_bytes"] = int(info.total)
        torch.cuda.reset_peak_memory_stats(self.device)
        return figures

    @staticmethod
    def describe(figures: dict[str, int]) -> str:
        """One short phrase for a log line."""
        if "memory/peak_allocated_bytes" in figures:
            text = (f"peak alloc {figures['memory/peak_allocated_bytes'] / GIB:.2f} GiB, reserved "
                    f"{figures['memory/peak_reserved_bytes'] / GIB:.2f} GiB")
            if "memory/device_used_bytes" in figures:
                text += (f", device {figures['memory/device_used_bytes'] / GIB:.1f}/"
                         f"{figures['memory/device_total_bytes'] / GIB:.1f} GiB")
            return text + (f", {figures['memory/alloc_retries']} allocator retries" if figures["memory/alloc_retries"] else "")
        return f"RSS {figures['memory/rss_bytes'] / 2**20:.0f} MiB (peak {figures['memory/peak_rss_bytes'] / 2**20:.0f} MiB)"
