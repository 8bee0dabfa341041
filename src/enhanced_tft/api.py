"""The Python API: what `etft` does, for a notebook, over the same code the command line runs.

    from enhanced_tft.api import Config, Run, plan, train
    cfg = Config.load("configs/default.yaml", ["train.epochs=3"])
    run = train(cfg, data=bars)                  # a DataFrame of bars (or a file's path); -> Run
    run.summary["test"], run.evaluate()["test"]  # the test split's metrics, as summary.json holds them
    predictions = run.predict(new_bars)          # the columns `etft predict` writes, as a DataFrame
    run.importance(), run.attention_by_lag()     # the test split's interpretation, as DataFrames
    run = Run.open("logs/training_20261129_101500", data=bars)   # later; `data` only for a DataFrame's run
    plan(cfg, gpu_memory="24GiB")                # the pre-flight memory plan; print() it for the table

Bad input raises `UserError` (a ValueError) with the message `etft` prints. Nothing is written outside the run
folder (LOG_DIR/training_<time>/): a DataFrame is checked and fingerprinted in memory, predictions are returned.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import schema as config_mod
from .config.schema import Config
from .data.sources import load_frame_bars
from .data.tables import new_data_config
from .errors import UserError
from .report.page import write_report
from .runs import ATTENTION_CSV, IMPORTANCE_BY_SYMBOL_CSV, IMPORTANCE_CSV, LOGGER_NAME, setup_console_logging
from .serving.export import export_run
from .serving.predict import evaluate_windows, predict_frame, prediction_job, read_overrides
from .serving.saved_run import SavedRun
from .tracking.tracker import require
from .training.plan_report import format_plan, plan_dims
from .training.planner import parse_bytes
from .training.planner import plan as plan_step
from .training.recipe import TrainRequest, resume_request, train_run

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Config", "Plan", "Run", "UserError", "plan", "resume", "train"]


def _config(config: Config | str | os.PathLike | None, overrides: Sequence[str]) -> Config:
    """A Config as given (with `overrides` on top), or loaded from a YAML path (None: the defaults)."""
    if isinstance(config, Config):
        return config_mod.with_overrides(config, overrides) if overrides else config
    if config is not None and not isinstance(config, (str, os.PathLike)):
        raise UserError(f"config must be a Config, the path of a YAML file or None, not {type(config).__name__}")
    return Config.load(config, overrides)


def _with_data(cfg: Config, data) -> tuple[Config, Any]:
    """The config reading `data` (a file's path, or a DataFrame checked here as a file's rows are: the bars)."""
    return (cfg, None) if data is None else new_data_config(cfg, data, {})


def _console() -> None:
    """Progress on the console as `etft` shows it, unless the caller set up logging for enhanced_tft itself."""
    import logging

    if not logging.getLogger(LOGGER_NAME).handlers:
        setup_console_logging()


def train(config: Config | str | os.PathLike | None = None, data=None, *, overrides: Sequence[str] = (),
          auto_batch: bool = False, gpu_memory: str | None = None) -> "Run":
    """Train a run as `etft train` does and open it. `data`: a DataFrame of bars (columns timestamp, symbol,
    open, high, low, close, volume, named or mapped by data.columns; a DatetimeIndex is the timestamp), a file's
    path, or None for the config's own data.source. One walk-forward fold at a time (data.fold=K)."""
    cfg, bars = _with_data(_config(config, overrides), data)
    if cfg.data.walk_forward_folds and cfg.data.fold is None:
        raise UserError(f"data.walk_forward_folds={cfg.data.walk_forward_folds} trains one run per fold: from Python "
                        "train each with data.fold=K (0-based) and compare their summaries, or run "
                        "`etft train` for every fold and the comparison table")
    if gpu_memory and not auto_batch:
        raise UserError("gpu_memory is the budget of auto_batch; add auto_batch=True, or use plan(config, gpu_memory)")
    return _run(cfg, TrainRequest(auto_batch=auto_batch, gpu_memory=gpu_memory, bars=bars), bars)


def resume(run: str | os.PathLike, data=None, *, overrides: Sequence[str] = (),
           allow_changed_data: bool = False) -> "Run":
    """Continue a stopped run from its last checkpoint (`etft train --resume`); `data`: the DataFrame a
    data.source=frame run was trained on, given again (it is compared with the run's fingerprint)."""
    from dataclasses import replace

    cfg, request = resume_request(run, list(overrides))
    bars = None
    if cfg.data.source == "frame":
        if data is None:
            raise UserError(f"{str(run)!r} was trained on a pandas DataFrame: resume(run, data=frame) with that frame")
        import pandas as pd

        if not isinstance(data, pd.DataFrame):
            raise UserError(f"{str(run)!r} was trained on a pandas DataFrame; data must be that DataFrame, not "
                            f"{type(data).__name__}")
        bars = load_frame_bars(data, cfg.data)
    elif data is not None:
        raise UserError(f"{str(run)!r} reads its own data ({cfg.data.source}); resume it without data=")
    return _run(cfg, replace(request, allow_changed_data=allow_changed_data, bars=bars), bars)


def _run(cfg: Config, request, bars) -> "Run":
    require(cfg.run.tracking)   # a missing MLflow/TensorBoard answers before any data or training
    _console()
    code, path = train_run(cfg, request)
    if code != 0:   # stopped by a signal (Ctrl-C in a notebook): the checkpoints are kept
        raise KeyboardInterrupt(f"training stopped (exit {code}); continue it with "
                                f"enhanced_tft.api.resume({str(path)!r}{', data=frame' if bars is not None else ''})")
    return Run(_saved(path), bars)


def _saved(path):
    return SavedRun.open(path)


class Run:
    """A finished run folder: its config, summary and members, to predict, evaluate and read."""

    def __init__(self, saved, bars=None):
        self._saved, self._bars = saved, bars

    @classmethod
    def open(cls, path: str | os.PathLike, data=None) -> "Run":
        """A finished run folder. `data`: for a run trained on a DataFrame, that DataFrame again (its own splits
        are then available to predict and evaluate; it is checked against the run's fingerprint when used)."""
        saved = _saved(path)
        if data is None:
            return cls(saved)
        if saved.cfg.data.source != "frame":
            raise UserError(f"{str(path)!r} reads its own data ({saved.cfg.data.source}); open it without data= "
                            "and give new data to predict() or evaluate()")
        return cls(saved, _with_data(saved.cfg, data)[1])

    @property
    def path(self) -> Path:
        return self._saved.path

    @property
    def config(self) -> Config:
        return self._saved.cfg

    @property
    def summary(self) -> dict:
        """summary.json: test metrics (`test`), baselines, ensemble, quant metrics, speed and memory."""
        return self._saved.summary

    @property
    def task(self):
        """The task object (tasks.py): its prediction columns, metrics and naive baseline."""
        return self._saved.task

    @property
    def symbols(self) -> list[str]:
        return list(self._saved.transform.symbols)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, task={self.config.task!r}, members={self.config.train.ensemble_size})"

    def _job(self, data, split: str, read: dict | None, batch_size: int | None, device: str,
             allow_changed_data: bool):
        if data is None and self.config.data.source == "frame" and self._bars is None:
            raise UserError(f"{str(self.path)!r} was trained on a pandas DataFrame: give new data, or open the run "
                            "with that frame (Run.open(path, data=frame)) to use its own splits")
        assignments = [f"data.{key}={json.dumps(value)}" for key, value in (read or {}).items()]   # JSON is YAML
        return prediction_job(self._saved, data, split, read_overrides(assignments), batch_size, device,
                              allow_changed_data, self._bars)

    def predict(self, data=None, *, split: str = "test", read: dict | None = None, batch_size: int | None = None,
                device: str = "auto", engine: str = "torch", allow_changed_data: bool = False) -> "pd.DataFrame":
        """Predictions with the columns `etft predict` writes: for every bar of `data` (a DataFrame or a path)
        that has a full window, or for the run's own `split` when `data` is None. `read`: data.* keys that say
        how to read the new data (columns, timestamp_format, ...). `engine="onnx"`: the run's export (export())
        by ONNX Runtime on the CPU."""
        return predict_frame(self._job(data, split, read, batch_size, device, allow_changed_data), engine)

    def evaluate(self, data=None, *, split: str = "test", read: dict | None = None, batch_size: int | None = None,
                 device: str = "auto", allow_changed_data: bool = False) -> dict:
        """The metrics `etft evaluate --json` prints (model, naive and LightGBM baselines, members, quant) on the
        run's own `split` or on new `data` (the windows whose outcome is known)."""
        job = self._job(data, split, read, batch_size, device, allow_changed_data)
        return evaluate_windows(job.run, job.windows, job.target_known, job.device, job.policy, job.batch_size)

    def _csv(self, name: str) -> "pd.DataFrame":
        import pandas as pd
        path = self._saved.folder.file(name)
        if not path.is_file():
            raise UserError(f"{str(self.path)!r} has no {name} (written after training from the test split; a run "
                            "whose interpretation failed has none: see its training.log)")
        return pd.read_csv(path)

    def importance(self, by_symbol: bool = False) -> "pd.DataFrame":
        """Variable importance on the test split (variable selection weights), overall or per symbol."""
        return self._csv(IMPORTANCE_BY_SYMBOL_CSV if by_symbol else IMPORTANCE_CSV)

    def attention_by_lag(self) -> "pd.DataFrame":
        """Attention of the last query over the lags of the window, per block, on the test split."""
        return self._csv(ATTENTION_CSV)

    def export(self, out: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
        """`etft export`: each member as ONNX, the transform and a manifest, in RUN/onnx (or `out`); the folder
        `enhanced_tft.serve.OnnxModel.open` serves without torch."""
        return Path(export_run(self.path, out, overwrite))

    def report(self) -> Path:
        """(Re)write the run's report.html and return its path."""
        return Path(write_report(self.path))


@dataclass(frozen=True)
class Plan:
    """`etft plan`'s result: `details` holds every number (`etft plan --json`), str() the table."""
    details: dict

    @property
    def peak_bytes(self) -> int:
        """Planned peak of one training step with the configured micro-batch, precision and checkpointing."""
        return int(self.details["peak_bytes"])

    @property
    def fits(self) -> bool | None:
        """With a budget: whether a micro-batch of at least 1 fits it (None without a budget)."""
        return self.details.get("fits")

    @property
    def micro_batch_size(self) -> int | None:
        """With a budget: the micro-batch that fits it (gradient_accumulation_steps keeps the effective batch)."""
        return self.details.get("micro_batch_size")

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.details["gradient_accumulation_steps"])

    def __str__(self) -> str:
        return format_plan(self.details)


def plan(config: Config | str | os.PathLike | None = None, gpu_memory: str | int | None = None, *,
         overrides: Sequence[str] = (), num_features: int | None = None, num_devices: int = 1) -> Plan:
    """The memory of one training step before any training (`etft plan`): every precision x checkpointing
    option, and with `gpu_memory` ("24GiB" or bytes) the micro-batch and accumulation that fit it."""
    cfg = _config(config, overrides)
    if num_features is not None and num_features < 1:
        raise UserError(f"num_features={num_features}; allowed: an integer >= 1")
    if num_devices < 1:
        raise UserError(f"num_devices={num_devices}; allowed: an integer >= 1")
    budget = None if gpu_memory is None else gpu_memory if isinstance(gpu_memory, int) else parse_bytes(gpu_memory)
    return Plan(plan_step(cfg, plan_dims(cfg, num_features), budget, num_devices))
