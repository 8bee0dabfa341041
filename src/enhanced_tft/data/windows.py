"""Samples as index views over one contiguous float32 array per input kind (all series end to end).

A sample is the row `end` of its last observed bar: observed inputs are rows end-T+1 .. end, known
inputs rows end-T+1 .. end+H (the H bars ahead are known in advance: calendar), the target sits at row
`end`. Nothing is copied per sample: `window(i)` returns views, and `batch(idx)` gathers a whole batch
with one index_select per input kind.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class SeriesArrays:
    """All series concatenated; one row per bar. Built once, shared by every split."""
    observed: torch.Tensor     # (N, F_obs) float32, scaled with train statistics
    known: torch.Tensor        # (N, F_known) float32
    target: torch.Tensor       # (N,) float32: what the task learns (scaled return, 0/1, or class id)
    raw_return: torch.Tensor   # (N,) float32: the raw target (forward log return, or forward realized volatility
                               # with data.target=volatility), in its own units, for metrics and baselines
    symbol: torch.Tensor       # (N,) int64: series id
    timestamp: torch.Tensor | None = None   # (N,) int64: the bar's time, ns since 1970 (UTC)


class WindowSet:
    """One split's samples; yields batches of window tensors."""

    def __init__(self, arrays: SeriesArrays, sample_ends: np.ndarray, sequence_length: int, horizon: int):
        self.arrays = arrays
        self.sample_ends = torch.as_tensor(np.ascontiguousarray(sample_ends), dtype=torch.int64)
        self.sequence_length = sequence_length
        self.horizon = horizon
        self._ends_np = self.sample_ends.numpy()
        self._past_offsets_np = np.arange(-sequence_length + 1, 1)              # (T,)
        self._known_offsets_np = np.arange(-sequence_length + 1, horizon + 1)  # (T+H,)

    def __len__(self) -> int:
        return int(self.sample_ends.numel())

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of sample i's observed (T, F_obs) and known (T+H, F_known) rows."""
        end = int(self.sample_ends[i])
        start = end - self.sequence_length + 1
        return self.arrays.observed[start:end + 1], self.arrays.known[start:end + 1 + self.horizon]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather samples `indices` (B,) into a batch dict of tensors.

        The gather runs in numpy (np.take): plain single-threaded copies. torch's index_select would wake its
        thread pool for a copy of about 1 MB, which costs ten times the copy itself when the cores are busy
        with the model. The results are tensors over the new numpy arrays (no further copy).
        """
        ends = self._ends_np[indices.numpy()]                                  # (B,)
        past_rows = (ends[:, None] + self._past_offsets_np).reshape(-1)       # (B*T,)
        known_rows = (ends[:, None] + self._known_offsets_np).reshape(-1)     # (B*(T+H),)
        a = self.arrays
        take = lambda tensor, rows: torch.from_numpy(np.take(tensor.numpy(), rows, axis=0))
        return {
            "observed": take(a.observed, past_rows).view(len(ends), self.sequence_length, -1),
            "known": take(a.known, known_rows).view(len(ends), self.sequence_length + self.horizon, -1),
            "symbol": take(a.symbol, ends),
            "target": take(a.target, ends),
            "raw_return": take(a.raw_return, ends),
        }

    def all_indices(self) -> torch.Tensor:
        return torch.arange(len(self))

    def subset(self, indices: torch.Tensor) -> "WindowSet":
        """The samples `indices` (B,) of this set, in that order, over the same arrays (nothing copied)."""
        return WindowSet(self.arrays, self.sample_ends[indices].numpy(), self.sequence_length, self.horizon)
