"""What training fitted on its train split and prediction must apply unchanged: the feature list, the
scaler, the target scaling and the symbols. Saved as scaler.json in the run folder."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from ..config import UserError
from ..tasks import TargetScale

FORMAT_VERSION = 2


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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "the saved transform") -> "Transform":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - {"version"} - set(raw))
        if missing or raw.get("version", 1) != FORMAT_VERSION:
            raise UserError(f"{source} is not a saved transform of this version (missing {', '.join(missing) or '-'}, "
                             f"version {raw.get('version', 1)}, expected {FORMAT_VERSION}): retrain the run with this "
                             "version of Enhanced TFT")
        return cls(**{k: v for k, v in raw.items() if k in names})

    def target_scale(self) -> TargetScale:
        """What turns the model's scaled output back into the raw target's units."""
        return TargetScale(self.target_std, self.target_mean)

    def scale(self, observed: np.ndarray, chunk_rows: int = 1 << 16) -> None:
        """(x - mean) / std in place, float32, a chunk of rows at a time (no full-size temporary)."""
        mean = np.asarray(self.mean, np.float32)
        inverse = (1.0 / np.asarray(self.std, np.float64)).astype(np.float32)
        for lo in range(0, len(observed), chunk_rows):
            block = observed[lo:lo + chunk_rows]
            block -= mean
            block *= inverse


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
