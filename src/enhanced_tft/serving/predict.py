"""A saved run -> predictions per symbol and timestamp, streamed to disk batch by batch; and its metrics on
any data (`etft evaluate`).

Each batch goes through every member (inference.infer), is turned into columns by the task (ensemble mean,
members' spread, each member) and written at once (Parquet row group or CSV append): memory stays that of one
batch whatever the number of rows. Metrics, when asked for, keep only the predictions themselves.

Legend: B batch, M members, O head outputs.
"""
from __future__ import annotations

import gzip
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import schema as config_mod
from ..data.pipeline import build_data, build_prediction_data
from ..data.tables import READ_KEYS, new_data_config, table_batches
from ..data.transform import Transform
from ..data.windows import WindowSet
from ..errors import UserError
from ..evaluation import blend, volatility
from ..evaluation.baselines import predict_saved
from ..evaluation.scorecard import quant_of, score
from ..runs import PREDICTIONS_TEST_CSV, STRONG_BASELINE_JSON, RunFolder, atomic_path, spreadsheet_safe
from ..runtime.precision import PrecisionPolicy, resolve_device, resolve_precision
from ..tasks import ensemble_mean, member_stack
from .inference import infer
from .saved_run import SavedRun, check_own_data, transform_differences

log = logging.getLogger(__name__)



class TableWriter:
    """Appends column batches to a Parquet file (one row group per batch) or a CSV file (header once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        suffix = "".join(self.path.suffixes[-2:]) if self.path.suffix == ".gz" else self.path.suffix
        if suffix not in (".parquet", ".csv", ".csv.gz"):
            raise UserError(f"--out {str(path)!r}: allowed endings .parquet, .csv, .csv.gz")
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
            spreadsheet_safe(frame).to_csv(self._handle, header=self.rows == 0, index=False, float_format="%.8g")
        self.rows += len(frame)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def write_rows(writer: TableWriter, chunks: Iterator[tuple[torch.Tensor, list[torch.Tensor]]], split: WindowSet,
               transform: Transform, target_known: np.ndarray | None = None) -> None:
    """(sample indices (B,), [member prediction]) batches -> rows: where, what followed, the task's columns."""
    for columns in table_batches(split.arrays.rows(), split.sample_ends.numpy(), target_known, transform, chunks):
        writer.write(columns)


def prediction_windows(run: SavedRun, data_path, split: str, read_overrides: dict,
                       allow_changed_data: bool = False, own_bars=None) -> tuple[WindowSet, np.ndarray | None]:
    """The windows to predict: every bar of new data (a file's path or a pandas DataFrame; the run's transform
    applied), or a split of the run's own data (`own_bars`: a data.source=frame run's DataFrame, checked, again)."""

    if data_path is None:
        if read_overrides:
            raise UserError("--set data.* applies to --data PATH only; without --data the run's own data is used")
        check_own_data(run, allow_changed_data, own_bars)
        data = build_data(run.cfg, own_bars)
        changed = transform_differences(run.transform, data.transform)
        if changed:
            raise UserError("the run's own data no longer gives the transform it was trained with (" + "; ".join(
                changed) + "): has the data file changed? Predict it with --data PATH instead")
        return data.splits[split], None
    cfg, bars = new_data_config(run.cfg, data_path, read_overrides)
    prediction = build_prediction_data(cfg, run.transform, bars)
    return prediction.windows, prediction.target_known


def _member_chunks(models, task, windows, device, policy, batch_size):
    for chunk in infer(models, task, windows, device, policy, batch_size, what="prediction"):
        yield chunk.indices, chunk.predictions


ENGINES = ("torch", "onnx")


def member_chunks(run: SavedRun, windows: WindowSet, device: torch.device, policy: PrecisionPolicy, batch_size: int,
                  engine: str = "torch"):
    """(sample indices (B,), [member prediction]) batches of `windows` through the run's members: in torch, or as
    its ONNX export (RUN/onnx, by ONNX Runtime on the CPU). The rows written from them are the same code either way."""
    if engine == "onnx":
        if device.type != "cpu":
            log.warning("--engine onnx runs on the CPU (ONNX Runtime's CPU provider); the device applies to torch")
        return run.onnx_model().member_chunks(windows.arrays.rows(), windows.sample_ends.numpy(), batch_size)
    if engine != "torch":
        raise UserError(f"engine={engine!r}; allowed: {', '.join(ENGINES)}")
    return _member_chunks(run.load_models(device), run.task, windows, device, policy, batch_size)


def predict_to_file(run: SavedRun, windows: WindowSet, target_known: np.ndarray | None, out: Path,
                    device: torch.device, policy: PrecisionPolicy, batch_size: int, engine: str = "torch") -> int:
    """Stream every window's predictions to `out` (written whole: a crash leaves no half file); returns the rows."""
    chunks = member_chunks(run, windows, device, policy, batch_size, engine)
    with atomic_path(out) as tmp:
        writer = TableWriter(tmp)
        try:
            write_rows(writer, chunks, windows, run.transform, target_known)
        finally:
            writer.close()
    return writer.rows


class FrameWriter:
    """TableWriter's interface, into a pandas DataFrame in memory (the Python API's Run.predict)."""

    def __init__(self):
        self.parts: list = []
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        import pandas as pd
        self.parts.append(pd.DataFrame(columns))
        self.rows += len(self.parts[-1])

    def frame(self):
        import pandas as pd
        return pd.concat(self.parts, ignore_index=True) if self.parts else pd.DataFrame()


def predict_frame(job: "PredictionJob", engine: str = "torch"):
    """Every window's predictions as a DataFrame, the columns `etft predict` writes (`engine`: torch or onnx)."""
    writer = FrameWriter()
    write_rows(writer, member_chunks(job.run, job.windows, job.device, job.policy, job.batch_size, engine),
               job.windows, job.run.transform, job.target_known)
    return writer.frame()


def write_test_predictions(folder: RunFolder, windows: WindowSet, transform: Transform,
                           member_predictions: list[torch.Tensor], chunk_size: int = 4096,
                           others: dict[str, list[torch.Tensor]] | None = None) -> Path:
    """predictions_test.csv, as `etft predict` writes it, from the members' test predictions kept after
    training (no further pass through the models); `others` ({"blend": [predictions]}) add their columns."""
    out = folder.file(PREDICTIONS_TEST_CSV)
    indices = windows.all_indices()
    others = {name: predictions[0] for name, predictions in (others or {}).items()}
    chunks = ((indices[i:i + chunk_size], [p[i:i + chunk_size] for p in member_predictions],
               {name: p[i:i + chunk_size] for name, p in others.items()})
              for i in range(0, len(windows), chunk_size))
    with atomic_path(out) as tmp:
        writer = TableWriter(tmp)
        try:
            write_rows(writer, chunks, windows, transform)
        finally:
            writer.close()
    return out


def evaluate_windows(run: SavedRun, windows: WindowSet, target_known: np.ndarray | None, device: torch.device,
                     policy: PrecisionPolicy, batch_size: int) -> dict:
    """The metrics summary.json holds, on these windows (those whose outcome is known): ensemble, members, naive baseline."""
    task = run.task
    kept: list[list[torch.Tensor]] = [[] for _ in range(run.cfg.train.ensemble_size)]
    for _, predictions in _member_chunks(run.load_models(device), task, windows, device, policy, batch_size):
        for store, prediction in zip(kept, predictions):
            store.append(prediction)
    members = [torch.cat(store) for store in kept]
    mask = torch.ones(len(windows), dtype=torch.bool) if target_known is None else torch.from_numpy(target_known)
    if run.transform.binary_dead_zone:   # scored as in training: the samples of the dead zone are left out
        mask &= windows.outcomes()[1].abs() > run.transform.binary_dead_zone
    if not bool(mask.any()):
        raise UserError(f"no window of the data has its outcome {run.transform.horizon} bar(s) ahead: nothing to score")
    target, raw = windows.outcomes(mask)
    saved = run.summary["baseline"]
    scores = score(task, [m[mask] for m in members], target, raw, run.transform.target_scale(), saved["output"])
    result = {"task": task.name, "test": scores["test"], "baseline": {"rule": saved["rule"], **scores["baseline"]},
              "ensemble": {"size": len(members), "members": [{"member": i, "test": m}
                                                             for i, m in enumerate(scores["members"])],
                           "mean_member": scores["mean_member"]}}
    strong = _strong_baseline(run, windows)
    scale = run.transform.target_scale()
    blended = None
    if strong is not None:
        result["strong_baseline"] = {"rule": run.summary.get("strong_baseline", {}).get("rule", "LightGBM"),
                                     **task.metrics(strong[mask], target, raw, scale)}
        saved_blend = run.summary.get("blend")
        if saved_blend:   # the weight fitted on the run's val split, applied unchanged
            model = torch.from_numpy(ensemble_mean(member_stack(members)))
            blended = blend.mix(model, strong, float(saved_blend["weight_model"]))
            result["blend"] = {"rule": saved_blend["rule"], "weight_model": saved_blend["weight_model"],
                               "weight_strong_baseline": saved_blend["weight_strong_baseline"],
                               "test": task.metrics(blended[mask], target, raw, scale)}
    har = run.summary.get("volatility_baselines", {}).get("har", {}).get("coefficients")
    if har is not None and windows.arrays.history is not None:   # the HAR as fitted on the run's train split
        result["volatility_baselines"] = volatility.baselines(
            windows.arrays.history, windows.arrays.raw_return.numpy(), windows.sample_ends[mask].numpy(), har)
    quant = quant_of(run.cfg, run.transform, windows, members, target_known)
    if quant is not None:
        result["quant"] = {"model": quant}
        for key, predictions in (("strong_baseline", strong), ("blend", blended)):
            if predictions is not None:
                result["quant"][key] = quant_of(run.cfg, run.transform, windows, [predictions], target_known)
    return result


def _strong_baseline(run: SavedRun, windows: WindowSet) -> torch.Tensor | None:
    """The run's LightGBM baseline (strong_baseline.json) on `windows`, or None where the run has none or
    LightGBM is not installed (said in the log)."""
    if run.folder.missing(STRONG_BASELINE_JSON):
        return None
    try:
        return predict_saved(run.folder.read_json(STRONG_BASELINE_JSON), run.task, windows)
    except UserError as err:
        log.warning("strong baseline left out: %s", err)
        return None


@dataclass
class PredictionJob:
    """What `etft predict` / `evaluate` run: the saved run, the windows, and how to run them."""
    run: SavedRun
    windows: WindowSet
    target_known: np.ndarray | None
    device: torch.device
    policy: PrecisionPolicy
    batch_size: int


def read_overrides(assignments: list[str]) -> dict:
    """--set data.KEY=VALUE for predict/evaluate: only the keys that say how to read a file."""
    raw: dict = {}
    for assignment in assignments:
        config_mod.apply_override(raw, assignment)
    section = raw.pop("data", {})
    bad = [k for k in raw] + [f"data.{k}" for k in section if k not in READ_KEYS]
    if bad:
        raise UserError(f"--set {', '.join(bad)}: only the keys that say how to read --data may change (the model "
                        f"was trained on the run's features); allowed: {', '.join('data.' + k for k in READ_KEYS)}")
    return section


def open_prediction(run_path: str, data_path: str | None, split: str, overrides: list[str], batch_size: int | None,
                    device_name: str, allow_changed_data: bool = False) -> PredictionJob:
    """The saved run, the windows to predict, and the device and precision the run evaluated with."""
    read = read_overrides(overrides)
    return prediction_job(SavedRun.open(run_path), data_path, split, read, batch_size, device_name,
                          allow_changed_data)


def prediction_job(run: SavedRun, data, split: str, read: dict, batch_size: int | None, device_name: str,
                   allow_changed_data: bool = False, own_bars=None) -> PredictionJob:
    """`run`'s windows of `data` (a path, a DataFrame, or None: the run's own `split`) on the device asked for."""
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size={batch_size}; allowed: an integer >= 1")
    if split not in ("train", "val", "test"):
        raise UserError(f"split={split!r}; allowed: train, val, test")

    device = resolve_device(device_name)
    policy = resolve_precision(run.cfg.train.mixed_precision, device)
    windows, target_known = prediction_windows(run, data, split, read, allow_changed_data, own_bars)
    what = (f"the {split} split of the run's data" if data is None else
            str(data) if isinstance(data, (str, os.PathLike)) else "the DataFrame")
    log.info("%s: %d windows of %d symbol(s); %d member(s) on %s, %s", what, len(windows), len(run.transform.symbols),
             run.cfg.train.ensemble_size, device, policy.name)
    # the run's evaluation chunk by default: the same chunks give the same numbers to the bit
    return PredictionJob(run, windows, target_known, device, policy, batch_size or 2 * run.cfg.train.micro_batch_size)
