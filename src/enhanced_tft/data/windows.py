"""Samples as index views over one contiguous float32 array per input kind (all series end to end).

A sample is the row `end` of its last observed bar: observed inputs are rows end-T+1 .. end, known
inputs rows end-T+1 .. end+H (the H bars ahead are known in advance: calendar), the target sits at row
`end`. Nothing is copied per sample: `window(i)` returns views, and `batch(idx)` gathers a whole batch
with one numpy take per input kind (data/rows.py: the same gather as the torch-free serving path).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .rows import RowArrays, gather_windows


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
    # (N, 4) float32 numpy, data.target=volatility only: the trailing realized volatility over the horizon, a day,
    # a week and a month of bars up to each row, raw (Transform.history_windows): the volatility baselines' inputs
    history: np.ndarray | None = None

    @classmethod
    def from_rows(cls, rows: RowArrays) -> "SeriesArrays":
        """Tensors over the numpy rows (no copy)."""
        return cls(observed=torch.from_numpy(rows.observed), known=torch.from_numpy(rows.known),
                   target=torch.from_numpy(rows.target), raw_return=torch.from_numpy(rows.raw_return),
                   symbol=torch.from_numpy(rows.symbol),
                   timestamp=None if rows.timestamp is None else torch.from_numpy(rows.timestamp))

    def rows(self) -> RowArrays:
        """The same arrays as numpy views (no copy): what the torch-free code reads."""
        return RowArrays(self.observed.numpy(), self.known.numpy(), self.target.numpy(), self.raw_return.numpy(),
                         self.symbol.numpy(), None if self.timestamp is None else self.timestamp.numpy())


class WindowSet:
    """One split's samples; yields batches of window tensors."""

    def __init__(self, arrays: SeriesArrays, sample_ends: np.ndarray, sequence_length: int, horizon: int):
        self.arrays = arrays
        self.sample_ends = torch.as_tensor(np.ascontiguousarray(sample_ends), dtype=torch.int64)
        self.sequence_length = sequence_length
        self.horizon = horizon
        self._ends_np = self.sample_ends.numpy()

    def __len__(self) -> int:
        return int(self.sample_ends.numel())

    def window(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (no copy) of sample i's observed (T, F_obs) and known (T+H, F_known) rows."""
        end = int(self.sample_ends[i])
        start = end - self.sequence_length + 1
        return self.arrays.observed[start:end + 1], self.arrays.known[start:end + 1 + self.horizon]

    def batch(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather samples `indices` (B,) into a batch dict of tensors.

        The gather runs in numpy (rows.gather_windows, which says why); the results are tensors over the new
        numpy arrays (no further copy).
        """
        ends = self._ends_np[indices.numpy()]                                  # (B,)
        a = self.arrays
        observed, known = gather_windows(a.observed.numpy(), a.known.numpy(), ends, self.sequence_length, self.horizon)
        take = lambda tensor, rows: torch.from_numpy(np.take(tensor.numpy(), rows, axis=0))
        return {
            "observed": torch.from_numpy(observed),
            "known": torch.from_numpy(known),
            "symbol": take(a.symbol, ends),
            "target": take(a.target, ends),
            "raw_return": take(a.raw_return, ends),
        }

    def outcomes(self, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """What followed each sample (those of `mask` (N,) bool, or all): the task's target (N,) and the raw
        forward return (N,), in the set's order."""
        ends = self.sample_ends if mask is None else self.sample_ends[mask]
        return self.arrays.target.index_select(0, ends), self.arrays.raw_return.index_select(0, ends)

    def all_indices(self) -> torch.Tensor:
        return torch.arange(len(self))

    def subset(self, indices: torch.Tensor) -> "WindowSet":
        """The samples `indices` (B,) of this set, in that order, over the same arrays (nothing copied)."""
        return WindowSet(self.arrays, self.sample_ends[indices].numpy(), self.sequence_length, self.horizon)
