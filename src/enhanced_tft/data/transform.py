"""What training fitted on its train split and prediction must apply unchanged: the feature list, the
scaler, the target scaling and the symbols. Saved as scaler.json in the run folder."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ..config.schema import MAX_HORIZON, MAX_SEQUENCE_LENGTH
from ..errors import UserError
from ..tasks import TargetScale
from ..tasks import names as task_names
from .features import HistoryWindows

FORMAT_VERSION = 2
OPTIONAL = ("history_windows", "target_log")   # fields a transform of another target leaves out


@dataclass
class Transform:
    task: str
    target: str                   # "return" | "volatility"
    sequence_length: int
    horizon: int
    features: list[str]           # observed inputs, in the model's order
    known_features: list[str]     # known-future inputs (calendar)
    extra_columns: list[str]      # the file's columns passed through (a subset of `features`)
    symbols: list[str]            # symbol id i of the model's embedding = symbols[i]
    mean: list[float]             # per observed feature, train rows only
    std: list[float]
    target_mean: float            # regression/quantile targets are (raw - target_mean) / target_std
    target_std: float
    dead_zone: float              # multiclass: |return| at or below this is 'flat'
    binary_dead_zone: float       # classification_binary: samples with |return| at or below this are left out
    version: int = FORMAT_VERSION
    # data.target=volatility only (absent from other runs' scaler.json, which stay as they were):
    history_windows: list[int] = field(default_factory=list)   # horizon, day, week, month (features.HistoryWindows)
    target_log: bool = False      # the target is log volatility: raw = exp(scaled * target_std + target_mean)

    def to_dict(self) -> dict:
        out = asdict(self)
        for optional in OPTIONAL:
            if out[optional] in (False, []):
                del out[optional]
        return out

    @classmethod
    def from_dict(cls, raw: dict, source: str = "the saved transform") -> "Transform":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - {"version", *OPTIONAL} - set(raw))
        if missing or raw.get("version", 1) != FORMAT_VERSION:
            raise UserError(f"{source} is not a saved transform of this version (missing {', '.join(missing) or '-'}, "
                             f"version {raw.get('version', 1)}, expected {FORMAT_VERSION}): retrain the run with this "
                             "version of Enhanced TFT")
        problems = _problems(raw)
        if problems:
            raise UserError(f"{source} is not a valid saved transform: {'; '.join(problems[:6])}"
                            f"{f' (and {len(problems) - 6} more)' if len(problems) > 6 else ''}. It is written by "
                            "training and must not be edited: restore it from the run as trained, or retrain")
        return cls(**{k: v for k, v in raw.items() if k in names})

    def sha256(self) -> str:
        """A hash of every fitted value: summary.json keeps it, so that an edited scaler.json is noticed."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    def check_against(self, cfg, source: str) -> None:
        """The transform must belong to this config (config.yaml of the same run)."""
        pairs = (("task", self.task, cfg.task), ("target", self.target, cfg.data.target),
                 ("sequence_length", self.sequence_length, cfg.data.sequence_length),
                 ("horizon", self.horizon, cfg.data.horizon))
        wrong = [f"{key} {mine!r} here, {theirs!r} in config.yaml" for key, mine, theirs in pairs if mine != theirs]
        if wrong:
            raise UserError(f"{source} does not belong to the run's config.yaml ({'; '.join(wrong)}): the two files "
                            "come from different runs; restore the run's own files, or retrain")

    def target_scale(self) -> TargetScale:
        """What turns the model's scaled output back into the raw target's units."""
        return TargetScale(self.target_std, self.target_mean, self.target_log)

    def history(self):
        """The windows of the trailing realized volatilities (features.HistoryWindows), or None (not volatility)."""
        return HistoryWindows(*self.history_windows) if self.history_windows else None

    def scale(self, observed: np.ndarray, chunk_rows: int = 1 << 16) -> None:
        """(x - mean) / std in place, float32, a chunk of rows at a time (no full-size temporary)."""
        mean = np.asarray(self.mean, np.float32)
        inverse = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)
        for lo in range(0, len(observed), chunk_rows):
            block = observed[lo:lo + chunk_rows]
            block -= mean
            block *= inverse


def _problems(raw: dict) -> list[str]:
    """What is wrong with a saved transform's values (types, ranges, lengths), in words."""

    def text_list(key: str, allow_empty: bool = False) -> list | None:
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            out.append(f"{key} must be a list of non-empty names")
            return None
        if not value and not allow_empty:
            out.append(f"{key} is empty")
        elif len(set(value)) != len(value):
            out.append(f"{key} names one entry twice")
        return value

    def number(key: str, low: float, positive: bool = False) -> None:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < low \
                or (positive and value <= 0):
            out.append(f"{key}={value!r:.40} must be a finite number {'> 0' if positive else f'>= {low:g}'}")

    out: list[str] = []
    if raw["task"] not in task_names():
        out.append(f"task={str(raw['task'])[:40]!r} is not one of {', '.join(task_names())}")
    if raw["target"] not in ("return", "volatility"):
        out.append(f"target={str(raw['target'])[:40]!r} must be 'return' or 'volatility'")
    for key, top in (("sequence_length", MAX_SEQUENCE_LENGTH), ("horizon", MAX_HORIZON)):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or not (1 + (key == "sequence_length")) <= value <= top:
            out.append(f"{key}={value!r:.40} must be an integer in [{1 + (key == 'sequence_length')}, {top}]")
    features = text_list("features")
    text_list("known_features")
    extra = text_list("extra_columns", allow_empty=True)
    text_list("symbols")
    if features is not None and extra is not None and not set(extra) <= set(features):
        out.append("extra_columns must be among features")
    for key in ("mean", "std"):
        value = raw[key]
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in value):
            out.append(f"{key} must be a list of numbers")
        elif features is not None and len(value) != len(features):
            out.append(f"{key} has {len(value)} values for {len(features)} features")
        elif not np.all(np.isfinite(value)) or (key == "std" and not np.all(np.asarray(value, np.float64) > 0)):
            out.append(f"{key} must be finite{' and > 0 (a zero std divides by zero)' if key == 'std' else ''}")
    number("target_mean", -np.inf)
    number("target_std", 0.0, positive=True)
    number("dead_zone", 0.0)
    number("binary_dead_zone", 0.0)
    windows = raw.get("history_windows", [])
    if not isinstance(windows, list) or len(windows) not in (0, 4) or not all(
            isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in windows):
        out.append("history_windows must be four positive integers (horizon, day, week, month) or absent")
    if not isinstance(raw.get("target_log", False), bool):
        out.append("target_log must be true or false")
    return out


class RunningMoments:
    """Mean and std per column over row blocks (Chan et al.'s pairwise update, float64): the train statistics
    of an array too large to copy to float64 at once."""

    def __init__(self, num_columns: int):
        self.count = 0
        self.mean = np.zeros(num_columns)
        self.m2 = np.zeros(num_columns)

    def add(self, rows: np.ndarray, chunk_rows: int = 1 << 16) -> None:
        for lo in range(0, len(rows), chunk_rows):
            block = rows[lo:lo + chunk_rows].astype(np.float64)
            n = len(block)
            if n == 0:
                continue
            mean = block.mean(axis=0)
            m2 = ((block - mean) ** 2).sum(axis=0)
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * n / total
            self.m2 = self.m2 + m2 + delta ** 2 * self.count * n / total
            self.count = total

    def std(self) -> np.ndarray:
        std = np.sqrt(self.m2 / max(self.count, 1))
        return np.where(std > 1e-12, std, 1.0)
