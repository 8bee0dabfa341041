"""Memory figures for the log and summary (allocator, NVML, RSS), and release of memory between runs."""
from __future__ import annotations

import gc
import os
import resource
import sys

import torch

GIB = 2**30


class OutOfMemoryGiveUp(RuntimeError):
    """Out of memory even at one sample per (micro-)batch: the config itself must change (exit 3)."""


def give_up_message(cfg, phase: str) -> str:
    """What to change when even micro-batch 1 runs out of memory, with the config's current sizes."""
    m = cfg.model
    return (f"out of memory in {phase} even at micro-batch 1 (d_model {m.d_model}, ff_dim {m.ff_dim}, "
            f"{m.num_transformer_blocks} blocks, sequence_length {cfg.data.sequence_length}, precision "
            f"{cfg.train.mixed_precision}, activation_checkpointing {cfg.train.activation_checkpointing}). "
            "Change the config: set train.activation_checkpointing=all and train.mixed_precision=bf16, or lower "
            "data.sequence_length, model.d_model, model.ff_dim, model.num_transformer_blocks or "
            "model.variable_hidden_size; `etft plan` shows what fits.")


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


def available_ram_bytes() -> int:
    """MemAvailable of /proc/meminfo (what the machine can still give), or the total RAM elsewhere."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
