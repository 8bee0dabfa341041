"""The per-row arrays of all series end to end as numpy, and the samples read from them: torch-free, so that the
window gathering that training and `etft predict` run (data/windows.py WindowSet.batch) is the very code that the
ONNX serving path runs (serving/onnx_model.py), which never imports torch.

A sample is the row `end` of its last observed bar: observed inputs are rows end-T+1 .. end, known inputs rows
end-T+1 .. end+H (calendar, known ahead), the target sits at row `end`.

Legend: N rows, B samples, T sequence_length, H horizon, L = T + H.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RowArrays:
    """All series concatenated, one row per bar (views of the same memory as the tensors of SeriesArrays)."""
    observed: np.ndarray              # (N, F_obs) float32, scaled with train statistics
    known: np.ndarray                 # (N, F_known) float32
    target: np.ndarray                # (N,) float32: what the task learns (scaled target, 0/1, or class id)
    raw_return: np.ndarray            # (N,) float32: the raw target in its own units (0 where it is unknown)
    symbol: np.ndarray                # (N,) int64: series id
    timestamp: np.ndarray | None      # (N,) int64: ns since 1970 (UTC), or None


def gather_windows(observed_NF: np.ndarray, known_NK: np.ndarray, ends_B: np.ndarray, sequence_length: int,
                   horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """The model inputs of the samples ending at rows `ends_B`: observed (B, T, F_obs) and known (B, L, F_known).

    The gather runs in numpy (np.take): plain single-threaded copies. torch's index_select would wake its
    thread pool for a copy of about 1 MB, which costs ten times the copy itself when the cores are busy
    with the model.
    """
    past_rows = (ends_B[:, None] + np.arange(-sequence_length + 1, 1)).reshape(-1)              # (B*T,)
    known_rows = (ends_B[:, None] + np.arange(-sequence_length + 1, horizon + 1)).reshape(-1)   # (B*L,)
    batch = len(ends_B)
    return (np.take(observed_NF, past_rows, axis=0).reshape(batch, sequence_length, -1),
            np.take(known_NK, known_rows, axis=0).reshape(batch, sequence_length + horizon, -1))
