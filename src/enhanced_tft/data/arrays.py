"""The per-row arrays of all series end to end, allocated once at their final size and filled symbol by symbol.

With a folder (data.memory_map_dir) the feature array lives in a memory-mapped file there: the OS pages in
the rows a batch touches and can drop them again, so the data may be larger than RAM. The file is unlinked
as soon as it is mapped: it takes disk space while the run lasts and is never left behind.

torch is imported only where the arrays become tensors (`finish`): the ONNX serving path fills a buffer too.
"""
from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING

import numpy as np

from .rows import RowArrays

if TYPE_CHECKING:   # pragma: no cover
    from .windows import SeriesArrays

log = logging.getLogger(__name__)


def _allocate(shape: tuple[int, ...], folder: str | None) -> np.ndarray:
    if folder is None or shape[0] == 0:   # (no rows: nothing to map, and the error about it comes later)
        return np.empty(shape, np.float32)   # pages are committed only when written: unused rows cost nothing
    os.makedirs(folder, exist_ok=True)
    handle, path = tempfile.mkstemp(prefix="etft_features_", suffix=".f32", dir=folder)
    try:
        os.ftruncate(handle, int(np.prod(shape)) * 4)
        array = np.memmap(path, dtype=np.float32, mode="r+", shape=shape)
    finally:
        os.close(handle)
        os.unlink(path)
    log.info("features in a memory-mapped file under %s (%.1f GiB, removed when the run ends)",
             folder, array.nbytes / 2**30)
    return array


class SeriesBuffer:
    def __init__(self, rows: int, num_observed: int, num_known: int, memory_map_dir: str | None = None):
        self.observed = _allocate((rows, num_observed), memory_map_dir)
        self.known = np.empty((rows, num_known), np.float32)
        self.forward_return = np.full(rows, np.nan, np.float32)
        self.forward_target = np.full(rows, np.nan, np.float32)
        self.timestamp = np.zeros(rows, "datetime64[ns]")
        self.symbol = np.zeros(rows, np.int64)
        self.size = 0
        self._arrays: "SeriesArrays | None" = None

    def append(self, rows: dict[str, np.ndarray], symbol_id: int) -> int:
        """Copy one series in; return the row offset it starts at."""
        offset, n = self.size, len(rows["observed"])
        end = offset + n
        self.observed[offset:end] = rows["observed"]
        self.known[offset:end] = rows["known"]
        self.forward_return[offset:end] = rows["forward_return"]
        self.forward_target[offset:end] = rows["forward_target"]
        self.timestamp[offset:end] = rows["timestamp"]
        self.symbol[offset:end] = symbol_id
        self.size = end
        return offset

    def trim(self) -> None:
        """Cut the arrays to the rows filled (views, no copy)."""
        n = self.size
        for name in ("observed", "known", "forward_return", "forward_target", "timestamp", "symbol"):
            setattr(self, name, getattr(self, name)[:n])

    def rows(self, target: np.ndarray) -> RowArrays:
        """The trimmed arrays as numpy rows, with the task's `target` per row."""
        return RowArrays(observed=self.observed, known=self.known,
                         target=np.ascontiguousarray(target, dtype=np.float32),
                         raw_return=np.nan_to_num(self.forward_target), symbol=self.symbol,
                         timestamp=self.timestamp.view(np.int64))

    def finish(self) -> "SeriesArrays":
        """Trim to the rows filled and wrap them as tensors sharing the same memory (targets set later)."""
        self.trim()
        from .windows import \
            SeriesArrays  # torch: here, so that the torch-free ONNX serving path can import this module
        self._arrays = SeriesArrays.from_rows(self.rows(np.zeros(self.size, np.float32)))
        return self._arrays

    def set_target(self, target: np.ndarray) -> None:
        import torch
        self._arrays.target = torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32))
