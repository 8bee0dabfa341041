"""Bars -> features and targets -> chronological, purged splits -> train-fitted scaling -> window sets."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..config import Config, DataConfig
from . import features
from .synthetic import generate_bars
from .windows import SeriesArrays, WindowSet

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Everything the trainer and the model need to know about the data, and nothing about files."""
    splits: dict[str, WindowSet]
    observed_names: list[str]
    known_names: list[str]
    symbols: list[str]
    task: str
    target_std: float            # train std of the forward log return (regression targets are divided by it)
    dead_zone: float             # multiclass: |return| at or below this is 'flat' (log-return units)
    scaler: dict[str, list[float]] = field(default_factory=dict)
    dropped_warmup_rows: int = 0

    @property
    def num_observed(self) -> int:
        return len(self.observed_names)

    @property
    def num_known(self) -> int:
        return len(self.known_names)


def split_bounds(num_rows: int, data: DataConfig) -> dict[str, tuple[int, int]]:
    """Row ranges [lo, hi) of each split within one series, with the purge gap between them."""
    gap = data.effective_purge_gap
    train_end = int(num_rows * (1.0 - data.val_fraction - data.test_fraction))
    val_end = int(num_rows * (1.0 - data.test_fraction))
    return {"train": (0, train_end), "val": (train_end + gap, val_end), "test": (val_end + gap, num_rows)}


def sample_ends_in(lo: int, hi: int, sequence_length: int, horizon: int) -> np.ndarray:
    """Last-bar rows of every sample whose window and target both lie inside [lo, hi)."""
    first = lo + sequence_length - 1
    last = hi - 1 - horizon
    return np.arange(first, last + 1, dtype=np.int64) if last >= first else np.empty(0, np.int64)


def load_bars(cfg: Config) -> pd.DataFrame:
    """Long-format bars of `cfg.data.source`: the embedded generator, or the user's file (data.path)."""
    data = cfg.data
    if data.source == "file":
        from .sources import load_file_bars
        return load_file_bars(data)
    return generate_bars(data.num_symbols, data.num_bars, seed=cfg.seed, bar_minutes=data.bar_minutes)


def make_targets(task: str, forward_return: np.ndarray, target_std: float, dead_zone: float) -> np.ndarray:
    """What the task learns, per row: scaled return, up-indicator, or class id (0 down, 1 flat, 2 up)."""
    if task in ("regression", "quantile"):
        return (forward_return / target_std).astype(np.float32)
    if task == "classification_binary":
        return (forward_return > 0).astype(np.float32)
    classes = np.where(forward_return > dead_zone, 2, np.where(forward_return < -dead_zone, 0, 1))
    return classes.astype(np.float32)


def build_data(cfg: Config, bars: pd.DataFrame | None = None) -> DataBundle:
    """Turn long-format bars (timestamp, symbol, OHLCV) into the three window sets of `cfg.task`."""
    data = cfg.data
    bars = load_bars(cfg) if bars is None else bars
    warmup = features.warmup_bars(data.return_lags, data.volatility_windows)
    observed_names = features.observed_feature_names(data.return_lags, data.volatility_windows)

    observed_parts, known_parts, return_parts, symbol_parts = [], [], [], []
    ends: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    train_rows: list[np.ndarray] = []
    symbols: list[str] = []
    skipped: list[str] = []
    offset = 0
    for symbol, frame in bars.groupby("symbol", sort=True):
        frame = frame.sort_values("timestamp")
        observed = features.observed_features(frame, data.return_lags, data.volatility_windows)[warmup:]
        known = features.known_features(frame["timestamp"])[warmup:]
        forward = features.forward_log_return(frame["close"].to_numpy(), data.horizon)[warmup:]
        n = len(observed)
        bounds = split_bounds(n, data)
        per_split = {s: sample_ends_in(lo, hi, data.sequence_length, data.horizon) for s, (lo, hi) in bounds.items()}
        if any(len(v) == 0 for v in per_split.values()):
            counts = ", ".join(f"{s} {len(v)}" for s, v in per_split.items())
            message = (f"symbol {symbol!r} has {len(frame)} bars: after {warmup} warm-up bars, sequence_length="
                       f"{data.sequence_length} and horizon={data.horizon} leave samples {counts}; every split "
                       "needs at least one")
            if data.too_short == "error":
                raise ValueError(f"{message}: give more bars, lower data.sequence_length, or set "
                                 "data.too_short=skip to leave such symbols out")
            log.warning("skipped %s (data.too_short=skip)", message)
            skipped.append(str(symbol))
            continue
        for s in SPLITS:
            ends[s].append(per_split[s] + offset)
        train_rows.append(np.arange(bounds["train"][0], bounds["train"][1]) + offset)
        observed_parts.append(observed)
        known_parts.append(known)
        return_parts.append(forward)
        symbol_parts.append(np.full(n, len(symbols), np.int64))
        symbols.append(str(symbol))
        offset += n
    if not symbols:
        raise ValueError(
            f"every symbol is too short and was skipped ({', '.join(skipped) or 'no bars'}): with sequence_length="
            f"{data.sequence_length}, horizon={data.horizon} and {warmup} warm-up bars, a split (val_fraction="
            f"{data.val_fraction:g}, test_fraction={data.test_fraction:g}) holds no window in any of them; give "
            "more bars or lower data.sequence_length")
    if skipped:
        log.warning("skipped %d of %d symbols as too short (data.too_short=skip): %s; training on %d: %s",
                    len(skipped), len(skipped) + len(symbols), ", ".join(skipped), len(symbols), ", ".join(symbols))
    log.info("features: %d observed + %d known per bar; dropped the first %d bars of each of %d series "
             "as feature warm-up", len(observed_names), len(features.KNOWN_FEATURES), warmup, len(symbols))

    observed = np.concatenate(observed_parts)
    forward = np.concatenate(return_parts)
    train_idx = np.concatenate(train_rows)
    mean = observed[train_idx].mean(axis=0, dtype=np.float64)
    std = observed[train_idx].std(axis=0, dtype=np.float64)
    std = np.where(std > 1e-12, std, 1.0)
    observed = ((observed - mean) / std).astype(np.float32)

    train_ends = np.concatenate(ends["train"])
    train_returns = forward[train_ends].astype(np.float64)
    target_std = float(train_returns.std()) or 1.0
    dead_zone = float(np.quantile(np.abs(train_returns), data.flat_fraction)) if data.flat_fraction else 0.0
    target = make_targets(cfg.task, np.nan_to_num(forward), target_std, dead_zone)

    arrays = SeriesArrays(
        observed=torch.from_numpy(np.ascontiguousarray(observed)),
        known=torch.from_numpy(np.ascontiguousarray(np.concatenate(known_parts))),
        target=torch.from_numpy(target),
        raw_return=torch.from_numpy(np.nan_to_num(forward).astype(np.float32)),
        symbol=torch.from_numpy(np.concatenate(symbol_parts)),
    )
    splits = {s: WindowSet(arrays, np.concatenate(ends[s]), data.sequence_length, data.horizon) for s in SPLITS}
    log.info("samples: train %d, val %d, test %d (sequence_length %d, horizon %d, purge gap %d)",
             len(splits["train"]), len(splits["val"]), len(splits["test"]), data.sequence_length,
             data.horizon, data.effective_purge_gap)
    return DataBundle(
        splits=splits, observed_names=observed_names, known_names=list(features.KNOWN_FEATURES),
        symbols=symbols, task=cfg.task, target_std=target_std, dead_zone=dead_zone,
        scaler={"features": observed_names, "mean": mean.tolist(), "std": std.tolist(),
                "target_std": target_std, "dead_zone": dead_zone},
        dropped_warmup_rows=warmup * len(symbols),
    )
