"""A saved run -> predictions per symbol and timestamp, streamed to disk batch by batch.

Each batch goes through every member, is turned into columns (ensemble mean, members' spread, each
member) and written at once (Parquet row group or CSV append): memory stays that of one batch
whatever the number of rows. Metrics, when asked for, keep only the predictions themselves.

Legend: B batch, M members, O head outputs (1, 3 quantiles or 3 classes).
"""
from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from .config import Config
from .data.transform import Transform
from .data.windows import WindowSet
from .model.heads import QUANTILES
from .model.tft import ModelDims
from .train.ensemble import load_member, transform_dims
from .train.precision import PrecisionPolicy

log = logging.getLogger(__name__)

MULTICLASS_NAMES = ("down", "flat", "up")


def output_names(task: str) -> list[str]:
    """Column names of one prediction, in the head's output order."""
    if task == "classification_binary":
        return ["p_up"]
    if task == "classification_multiclass":
        return [f"p_{name}" for name in MULTICLASS_NAMES]
    if task == "regression":
        return ["value"]
    return [f"p{round(q * 100)}" for q in QUANTILES]


def prediction_columns(task: str, member_predictions_MB: list[torch.Tensor], target_std: float,
                       target_mean: float = 0.0, with_members: bool = True) -> dict[str, np.ndarray]:
    """Columns of one batch: ensemble mean per output, its spread over members (std), the class, each member.

    Probabilities stay probabilities; regression and quantile values are in the raw target's units (forward
    log return, or realized volatility): the model's output times the train std, plus the train mean.
    """
    stacked_MBO = torch.stack(member_predictions_MB).float()
    if stacked_MBO.dim() == 2:
        stacked_MBO = stacked_MBO.unsqueeze(-1)
    mean_BO = stacked_MBO.mean(dim=0)
    spread_BO = stacked_MBO.std(dim=0, unbiased=False)   # 0 for a single member
    values = task in ("regression", "quantile")
    scale, shift = (target_std, target_mean) if values else (1.0, 0.0)
    names = output_names(task)
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        columns[name] = (mean_BO[:, j] * scale + shift).numpy()   # the order of task_metrics: same float32 result
    if task == "classification_binary":
        columns["class"] = (mean_BO[:, 0] > 0.5).to(torch.int8).numpy()
    elif task == "classification_multiclass":
        columns["class"] = mean_BO.argmax(dim=1).to(torch.int8).numpy()
    for j, name in enumerate(names):
        columns[f"{name}_spread"] = (spread_BO[:, j] * scale).numpy()
    if with_members and len(member_predictions_MB) > 1:
        for m in range(stacked_MBO.shape[0]):
            for j, name in enumerate(names):
                columns[f"member_{m}_{name}"] = (stacked_MBO[m, :, j] * scale + shift).numpy()
    return columns


class TableWriter:
    """Appends column batches to a Parquet file (one row group per batch) or a CSV file (header once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        suffix = "".join(self.path.suffixes[-2:]) if self.path.suffix == ".gz" else self.path.suffix
        if suffix not in (".parquet", ".csv", ".csv.gz"):
            raise ValueError(f"--out {str(path)!r}: allowed endings .parquet, .csv, .csv.gz")
        self.parquet = suffix == ".parquet"
        self._writer = None
        self._handle = None
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        import pandas as pd

        frame = pd.DataFrame(columns)
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, table.schema)
            self._writer.write_table(table)
        else:
            if self._handle is None:   # one handle for the whole file: gzip output stays one stream
                self._handle = (gzip.open(self.path, "wt", newline="") if self.path.suffix == ".gz"
                                else open(self.path, "w", newline=""))
            frame.to_csv(self._handle, header=self.rows == 0, index=False, float_format="%.8g")
        self.rows += len(frame)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _row_columns(split: WindowSet, chunk_B: torch.Tensor, ends_B: torch.Tensor, symbols: np.ndarray,
                 transform: Transform, target_known: np.ndarray | None) -> dict[str, np.ndarray]:
    """Which bar each prediction is made at, and what followed it (NaN where the data ends before the horizon)."""
    arrays = split.arrays
    rows = {"symbol": symbols[arrays.symbol.index_select(0, ends_B).numpy()]}
    if arrays.timestamp is not None:
        rows["timestamp"] = arrays.timestamp.index_select(0, ends_B).numpy().view("datetime64[ns]")
    known = np.ones(len(ends_B), bool) if target_known is None else target_known[chunk_B.numpy()]
    rows["actual"] = np.where(known, arrays.raw_return.index_select(0, ends_B).numpy(), np.nan).astype(np.float32)
    if transform.task.startswith("classification"):
        rows["label"] = np.where(known, arrays.target.index_select(0, ends_B).numpy(), np.nan).astype(np.float32)
    return rows


@torch.no_grad()
def predict_batches(models: list[torch.nn.Module], split: WindowSet, device: torch.device,
                    policy: PrecisionPolicy, batch_size: int):
    """Yield (sample indices (B,), [member prediction (B,) or (B, O)] on the CPU) batch by batch, in split order.

    Same chunking and precision as the trainer's evaluation, so the numbers are the same to the bit.
    """
    indices = split.all_indices()
    for start in range(0, len(split), batch_size):
        chunk = indices[start:start + batch_size]
        batch = split.batch(chunk)
        inputs = [batch[k].to(device, non_blocking=True) for k in ("observed", "known", "symbol")]
        outputs = []
        for model in models:
            with policy.autocast():
                output = model(*inputs).output
            outputs.append(model.head.predict(output).cpu())
        yield chunk, outputs


def stream_predictions(models: list[torch.nn.Module], split: WindowSet, transform: Transform, device: torch.device,
                       policy: PrecisionPolicy, batch_size: int, writer: TableWriter | None,
                       target_known: np.ndarray | None = None, keep: bool = False) -> list[torch.Tensor] | None:
    """Write every window's prediction through `writer`; with `keep`, also return each member's predictions."""
    kept: list[list[torch.Tensor]] = [[] for _ in models]
    symbols = np.asarray(transform.symbols, dtype=object)
    for chunk_B, member_predictions in predict_batches(models, split, device, policy, batch_size):
        if writer is not None:
            columns = prediction_columns(transform.task, member_predictions, transform.target_std,
                                         transform.target_mean)
            ends_B = split.sample_ends.index_select(0, chunk_B)
            writer.write({**_row_columns(split, chunk_B, ends_B, symbols, transform, target_known), **columns})
        if keep:
            for store, prediction in zip(kept, member_predictions):
                store.append(prediction)
    return [torch.cat(store) for store in kept] if keep else None


# data.* keys a user may change to read a new file; the others would change the features the model was trained on
READ_KEYS = ("columns", "timestamp_format", "skip_rows", "symbol", "duplicates", "missing", "too_short",
             "adjust_column", "fill_gaps", "memory_map_dir")


@dataclass
class SavedRun:
    """What prediction needs from a run folder: its config, its fitted transform, its summary, its members."""
    path: Path
    cfg: Config
    transform: Transform
    summary: dict

    @classmethod
    def open(cls, path: str | Path) -> "SavedRun":
        path = Path(path)
        missing = [name for name in ("config.yaml", "scaler.json", "summary.json") if not (path / name).is_file()]
        if missing:
            raise ValueError(f"--run {str(path)!r} lacks {', '.join(missing)}: not a finished run folder "
                             "(a folder like logs/training_20261128_101500)")
        summary = json.loads((path / "summary.json").read_text())
        if summary.get("status") != "completed":
            raise ValueError(f"--run {str(path)!r} did not finish (status {summary.get('status')!r}); finish it "
                             f"first with: etft train --resume {path}")
        transform = Transform.from_dict(json.loads((path / "scaler.json").read_text()), str(path / "scaler.json"))
        return cls(path, config_mod.load_config(path / "config.yaml"), transform, summary)

    def dims(self) -> ModelDims:
        return transform_dims(self.transform)

    def load_models(self, device: torch.device) -> list[torch.nn.Module]:
        """Every member's best weights; torch.load(weights_only=True) underneath: no code in a file runs."""
        paths = [self.path / "checkpoints" / f"member_{m}_best.pt" for m in range(self.cfg.train.ensemble_size)]
        absent = [str(p.relative_to(self.path)) for p in paths if not p.is_file()]
        if absent:
            raise ValueError(f"--run {str(self.path)!r} lacks {', '.join(absent)}: its members' weights")
        return [load_member(self.cfg, self.dims(), p, device) for p in paths]


def _differences(saved: Transform, rebuilt: Transform) -> list[str]:
    """The fields in which two transforms differ (numbers: beyond float rounding)."""
    out = []
    for key, before in saved.to_dict().items():
        after = getattr(rebuilt, key)
        numbers = isinstance(before, float) or (isinstance(before, list) and bool(before)
                                                and isinstance(before[0], float) and len(before) == len(after))
        if not (np.allclose(before, after, rtol=1e-6, atol=0) if numbers else before == after):
            out.append(f"{key}: {before!r:.80} at training, {after!r:.80} now")
    return out


def prediction_windows(run: SavedRun, data_path: str | None, split: str,
                       read_overrides: dict) -> tuple[WindowSet, np.ndarray | None]:
    """The windows to predict: every bar of a new file (run's transform applied), or a split of the run's own data."""
    from .data.pipeline import build_data, build_prediction_data

    if data_path is None:
        if read_overrides:
            raise ValueError("--set data.* applies to --data PATH only; without --data the run's own data is used")
        data = build_data(run.cfg)
        changed = _differences(run.transform, data.transform)
        if changed:
            raise ValueError("the run's own data no longer gives the transform it was trained with (" + "; ".join(
                changed) + "): has the data file changed? Predict it with --data PATH instead")
        return data.splits[split], None
    path = os.path.abspath(os.path.expanduser(data_path))
    try:
        cfg = config_mod.update(run.cfg, data={"source": "file", "path": path, **read_overrides})
    except config_mod.ConfigError as err:
        raise ValueError(str(err)) from None
    prediction = build_prediction_data(cfg, run.transform)
    return prediction.windows, prediction.target_known


def predict_to_file(run: SavedRun, windows: WindowSet, target_known: np.ndarray | None, out: Path,
                    device: torch.device, policy: PrecisionPolicy, batch_size: int) -> int:
    """Stream every window's predictions to `out`; returns the number of rows written."""
    models = run.load_models(device)
    writer = TableWriter(out)
    tmp = out.with_name(f".tmp.{out.name}")   # same ending: the writer picks the format from it
    writer.path = tmp   # a crash leaves no half file under the name the user asked for
    try:
        stream_predictions(models, windows, run.transform, device, policy, batch_size, writer, target_known)
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        tmp.unlink(missing_ok=True)
    return writer.rows


def evaluate_windows(run: SavedRun, windows: WindowSet, target_known: np.ndarray | None, device: torch.device,
                     policy: PrecisionPolicy, batch_size: int) -> dict:
    """summary.json's metrics on these windows (those whose outcome is known): ensemble, members, naive baseline."""
    from .train.metrics import task_metrics

    models = run.load_models(device)
    members = stream_predictions(models, windows, run.transform, device, policy, batch_size, None, keep=True)
    mask = torch.ones(len(windows), dtype=torch.bool) if target_known is None else torch.from_numpy(target_known)
    if run.transform.binary_dead_zone:   # scored as in training: the samples of the dead zone are left out
        mask &= windows.arrays.raw_return.index_select(0, windows.sample_ends).abs() > run.transform.binary_dead_zone
    if not bool(mask.any()):
        raise ValueError(f"no window of the data has its outcome {run.transform.horizon} bar(s) ahead: nothing to score")
    ends = windows.sample_ends[mask]
    target = windows.arrays.target.index_select(0, ends)
    actual = windows.arrays.raw_return.index_select(0, ends)
    t = run.transform
    scale = t.target_scale()
    task = t.task
    member_metrics = [task_metrics(task, m[mask], target, actual, **scale) for m in members]
    ensemble = task_metrics(task, torch.stack(members).mean(dim=0)[mask], target, actual, **scale)
    saved = run.summary["baseline"]
    constant = torch.tensor(saved["output"], dtype=torch.float32)
    baseline = constant.expand(len(ends), *constant.shape).clone()   # the train-fitted constant rule, every sample
    return {"task": task, "test": ensemble,
            "baseline": {"rule": saved["rule"], **task_metrics(task, baseline, target, actual, **scale)},
            "ensemble": {"size": len(members), "members": [{"member": i, "test": m} for i, m in enumerate(member_metrics)],
                         "mean_member": {k: sum(m[k] for m in member_metrics) / len(members) for k in ensemble}}}


def write_test_predictions(run_path: Path, data, device: torch.device, policy: PrecisionPolicy) -> Path:
    """predictions_test.csv in the run folder: the test split through the saved members, as `etft predict` writes it."""
    run = SavedRun.open(run_path)
    out = run_path / "predictions_test.csv"
    predict_to_file(run, data.splits["test"], None, out, device, policy, 2 * run.cfg.train.batch_size)
    return out
