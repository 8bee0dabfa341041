"""What prediction does around the model, whatever runs it (torch, or ONNX Runtime in `etft predict --engine onnx`
and in the torch-free serving path, serving/onnx_model.py): new data read with a run's settings, and the table of predictions.

The table, in numpy: for each sample where it ends (symbol, timestamp), what followed it (actual, and the label
for classifiers) and the task's columns of the members' predictions. Every engine builds its rows here, so that
they agree on every column. torch is never imported here.

Legend: N rows, B samples, M members.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np

from .. import tasks
from ..config import schema as config_mod
from ..config.schema import Config
from ..errors import UserError
from .rows import RowArrays
from .sources import load_frame_bars

# data.* keys a user may change to read a new file; the others would change the features the model was trained on
READ_KEYS = ("columns", "encoding", "timestamp_format", "skip_rows", "symbol", "duplicates", "missing", "too_short",
             "adjust_column", "fill_gaps", "memory_map_dir")


def new_data_config(cfg: Config, data, read: dict) -> tuple[Config, object | None]:
    """A run's config reading new `data` (a file's path, or a pandas DataFrame of bars) with the `read` keys
    (READ_KEYS) changed, and the checked bars of a DataFrame (None for a file: the pipeline reads it)."""
    import pandas as pd
    if isinstance(data, pd.DataFrame):
        cfg = config_mod.update(cfg, data={"source": "frame", "path": None, **read})
        return cfg, load_frame_bars(data, cfg.data)
    if not isinstance(data, (str, os.PathLike)):
        raise UserError(f"data must be a pandas DataFrame of bars or the path of a CSV/Parquet file, not "
                        f"{type(data).__name__}")
    path = os.path.abspath(os.path.expanduser(data))
    return config_mod.update(cfg, data={"source": "file", "path": path, **read}), None


def outcome_columns(rows: RowArrays, ends_B: np.ndarray, known_B: np.ndarray | None, transform,
                    symbols: np.ndarray) -> dict[str, np.ndarray]:
    """Which bar each prediction is made at, and what followed it (NaN where the data ends before the horizon):
    the future log return, or the realized volatility for data.target=volatility (what the model predicts)."""
    columns = {"symbol": symbols[rows.symbol[ends_B]]}
    if rows.timestamp is not None:
        columns["timestamp"] = rows.timestamp[ends_B].view("datetime64[ns]")
    known = np.ones(len(ends_B), bool) if known_B is None else known_B
    if transform.target == "volatility":
        scale = transform.target_scale()
        actual = scale.to_raw(rows.target[ends_B].astype(np.float64))
    else:
        actual = rows.raw_return[ends_B]
    columns["actual"] = np.where(known, actual, np.nan).astype(np.float32)
    if tasks.for_transform(transform).probabilities:   # classifiers: the class the outcome fell in
        columns["label"] = np.where(known, rows.target[ends_B], np.nan).astype(np.float32)
    return columns


def table_batches(rows: RowArrays, sample_ends: np.ndarray, target_known: np.ndarray | None, transform,
                  chunks: Iterable[tuple[object, list]], with_members: bool = True) -> Iterator[dict[str, np.ndarray]]:
    """(sample positions (B,), [member prediction (B,) or (B, O)][, {name: prediction (B,) or (B, O)}]) batches ->
    the table's columns of each batch; another forecaster's predictions (the blend's) add `name_<column>` columns.

    `sample_ends` (S,) are the rows of the samples' last bars, `target_known` (S,) whether each outcome is in the
    data (None: all are); positions and predictions may be torch tensors on the CPU or numpy arrays."""
    task = tasks.for_transform(transform)
    symbols = np.asarray(transform.symbols, dtype=object)
    scale = transform.target_scale()
    for positions_B, member_predictions, *others in chunks:
        index = np.asarray(positions_B)
        known = None if target_known is None else target_known[index]
        columns = {**outcome_columns(rows, sample_ends[index], known, transform, symbols),
                   **task.prediction_columns(member_predictions, scale, with_members)}
        for name, prediction in (others[0] if others else {}).items():   # another forecaster's: blend_p_up, ...
            own = task.prediction_columns([prediction], scale, with_members=False)
            columns.update({f"{name}_{column}": own[column] for column in task.columns})
        yield columns
