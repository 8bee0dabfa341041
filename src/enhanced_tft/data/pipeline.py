"""Bars -> features and targets -> chronological, purged splits -> train-fitted scaling -> window sets.

Memory: each output array is allocated once at its final size (in RAM, or in a memory-mapped file with
data.memory_map_dir) and filled symbol by symbol; statistics and scaling go by blocks of rows. The peak is
the output arrays plus one symbol's bars and features: never a second copy of the whole feature array.

torch is imported only where arrays become window sets: `prediction_rows` is the ONNX serving path's reader too.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import pandas as pd

from .. import tasks
from ..config.schema import Config, DataConfig
from ..errors import UserError
from . import features
from .arrays import SeriesBuffer
from .rows import RowArrays
from .sources import example_config, load_file_bars
from .synthetic import symbol_frame, symbol_name
from .transform import RunningMoments, Transform

if TYPE_CHECKING:   # pragma: no cover
    from .windows import WindowSet

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class DataBundle:
    """Everything the trainer and the model need to know about the data, and nothing about files."""
    splits: dict[str, WindowSet]
    transform: Transform

    observed_names = property(lambda self: self.transform.features)
    known_names = property(lambda self: self.transform.known_features)
    symbols = property(lambda self: self.transform.symbols)
    dead_zone = property(lambda self: self.transform.dead_zone)
    num_observed = property(lambda self: len(self.transform.features))
    history = property(lambda self: self.splits["train"].arrays.history)   # SeriesArrays.history

    def target_scale(self) -> tasks.TargetScale:
        return self.transform.target_scale()

    @property
    def scaler(self) -> dict:
        """What scaler.json holds: the whole fitted transform."""
        return self.transform.to_dict()


class BarSource:
    """Bars one symbol at a time, with each symbol's row count known before any is read (to size the arrays), and
    the pooled timeline's first and last timestamp where known (for cut dates shared by every symbol)."""

    def __init__(self, lengths: dict[str, int], frames: Iterator[tuple[str, pd.DataFrame]], extra_columns: list[str],
                 time_range: tuple[np.datetime64, np.datetime64] | None = None,
                 bar_spacing: np.timedelta64 | None = None, has_range: bool = True):
        self.lengths, self._frames, self.extra_columns = lengths, frames, extra_columns
        self.time_range = time_range
        self.bar_spacing = bar_spacing   # the median step between a symbol's bars (None: not known)
        self.has_range = has_range       # some bar's high is above its low (features.has_range)

    def frames(self) -> Iterator[tuple[str, pd.DataFrame]]:
        return self._frames

    @classmethod
    def from_frame(cls, bars: pd.DataFrame) -> "BarSource":
        groups = bars.groupby("symbol", sort=True)
        extra = [c for c in bars.columns if c not in ("timestamp", "symbol", "open", "high", "low", "close", "volume")]
        lengths = {str(k): int(v) for k, v in groups.size().items()}
        stamps = bars["timestamp"]
        time_range = (stamps.min().to_datetime64(), stamps.max().to_datetime64()) if len(bars) else None
        steps = groups["timestamp"].diff().dropna()
        spacing = steps.median().to_timedelta64() if len(steps) else None
        return cls(lengths, ((str(s), f.sort_values("timestamp")) for s, f in groups), extra, time_range, spacing,
                   features.has_range(bars) if len(bars) else True)


def bar_source(cfg: Config, bars: pd.DataFrame | None = None) -> BarSource:
    """`bars` if given, else the user's file (data.source=file), else the embedded generator, made lazily."""
    data = cfg.data
    if bars is not None:
        return BarSource.from_frame(bars)
    if data.source == "frame":
        raise UserError("data.source=frame: the bars are a pandas DataFrame given in Python "
                        "(enhanced_tft.api.train(config, data=frame)); from the command line use --data PATH")
    if data.source != "synthetic":
        return BarSource.from_frame(load_file_bars(data if data.source == "file" else example_config(data)))
    frames = ((symbol_name(i), symbol_frame(cfg.seed, i, data.num_bars, data.bar_minutes, num_extra=data.num_extra_features))
              for i in range(data.num_symbols))
    return BarSource({symbol_name(i): data.num_bars for i in range(data.num_symbols)}, frames,
                     [f"x_{i + 1}" for i in range(data.num_extra_features)],
                     bar_spacing=np.timedelta64(data.bar_minutes, "m"))


def load_bars(cfg: Config) -> pd.DataFrame:
    """All bars of `cfg.data.source` in one long-format frame."""
    return pd.concat([frame for _, frame in bar_source(cfg).frames()], ignore_index=True)


@dataclass(frozen=True)
class TimeCuts:
    """Cut times shared by every symbol (data.split=time): val from `val_start`, test from `test_start`, and
    nothing from `end` on (a walk-forward fold before the last; None = to the end of the data)."""
    val_start: np.datetime64
    test_start: np.datetime64
    end: np.datetime64 | None = None

    def describe(self) -> str:
        text = f"val from {pd.Timestamp(self.val_start)}, test from {pd.Timestamp(self.test_start)}"
        return text + (f" to {pd.Timestamp(self.end)}" if self.end is not None else "")


def time_cuts(data: DataConfig, time_range: tuple[np.datetime64, np.datetime64] | None) -> TimeCuts | None:
    """data.split=time: the fractions become fractions of the pooled time span (one set of cut dates for every
    symbol, so that no symbol trains on a period another is tested on). None where cuts stay per series: explicit
    dates (split_bounds applies them), data.split=per_symbol, or a source whose time span is not known before
    reading it (the synthetic symbols share one timeline, so their per-series cuts are shared cuts anyway)."""
    if data.split != "time" or data.val_start is not None or time_range is None:
        return None
    first, last = time_range
    span = last - first
    if span <= np.timedelta64(0, "ns"):
        return None

    def at(share: float) -> np.datetime64:   # to the second: a cut date a person can read and type
        exact = first + (span * share).astype("timedelta64[ns]")
        return (exact + np.timedelta64(500, "ms")).astype("datetime64[s]").astype("datetime64[ns]")

    if data.walk_forward_folds:
        fold = data.walk_forward_folds - 1 if data.fold is None else data.fold
        later = data.walk_forward_folds - 1 - fold                             # test blocks after this fold's
        end_share = 1.0 - later * data.test_fraction
        return TimeCuts(at(end_share - data.test_fraction - data.val_fraction), at(end_share - data.test_fraction),
                        at(end_share) if later else None)
    return TimeCuts(at(1.0 - data.val_fraction - data.test_fraction), at(1.0 - data.test_fraction))


def split_bounds(num_rows: int, data: DataConfig, timestamps: np.ndarray | None = None,
                 cuts: TimeCuts | None = None) -> dict[str, tuple[int, int]]:
    """Row ranges [lo, hi) of each split within one series, with the purge gap between them: by cut times shared
    by every series (`cuts`), by dates (data.val_start, data.test_start) when those are set, or by fractions of
    the series' own rows."""
    gap = data.effective_purge_gap
    if cuts is not None:
        train_end, val_end = (int(np.searchsorted(timestamps, t, side="left")) for t in (cuts.val_start, cuts.test_start))
        end = num_rows if cuts.end is None else int(np.searchsorted(timestamps, cuts.end, side="left"))
        return {"train": (0, train_end), "val": (train_end + gap, val_end), "test": (val_end + gap, end)}
    if data.walk_forward_folds:
        # fold k ends where its test block ends: the last fold is the plain split, each earlier one a block earlier
        test_rows, val_rows = int(num_rows * data.test_fraction), int(num_rows * data.val_fraction)
        fold = data.walk_forward_folds - 1 if data.fold is None else data.fold   # None: the last fold
        end = num_rows - (data.walk_forward_folds - 1 - fold) * test_rows
        train_end, val_end = end - test_rows - val_rows, end - test_rows
        return {"train": (0, train_end), "val": (train_end + gap, val_end), "test": (val_end + gap, end)}
    if data.val_start is not None:
        train_end, val_end = (int(np.searchsorted(timestamps, np.datetime64(pd.Timestamp(d)), side="left"))
                              for d in (data.val_start, data.test_start))
    else:
        train_end = int(num_rows * (1.0 - data.val_fraction - data.test_fraction))
        val_end = int(num_rows * (1.0 - data.test_fraction))
    return {"train": (0, train_end), "val": (train_end + gap, val_end), "test": (val_end + gap, num_rows)}


def split_plan(cfg: Config, source: BarSource) -> dict:
    """Where build_data cuts the splits of `cfg`, without computing a feature: the cut dates shared by every symbol
    (data.split=time over a known time span), else each series' row ranges [lo, hi) after the feature warm-up,
    as split_bounds gives them (rows a bar check drops would shift them; dates from data.val_start need the bars)."""
    data = cfg.data
    cuts = time_cuts(data, source.time_range)
    if cuts is not None:
        return {"cut_dates": {"val_start": str(pd.Timestamp(cuts.val_start)),
                              "test_start": str(pd.Timestamp(cuts.test_start)),
                              "end": None if cuts.end is None else str(pd.Timestamp(cuts.end))}}
    if data.val_start is not None:
        raise ValueError("split_plan: date splits (data.val_start) are cut on each series' timestamps; build the data")
    warmup = features.warmup_bars(data.return_lags, data.volatility_windows)
    return {"rows": {symbol: {name: list(bounds) for name, bounds in
                              split_bounds(max(n - warmup, 0), data).items()} for symbol, n in source.lengths.items()}}


def sample_ends_in(lo: int, hi: int, sequence_length: int, horizon: int) -> np.ndarray:
    """Last-bar rows of every sample whose window and target both lie inside [lo, hi)."""
    first = lo + sequence_length - 1
    last = hi - 1 - horizon
    return np.arange(first, last + 1, dtype=np.int64) if last >= first else np.empty(0, np.int64)


def make_targets(task: tasks.Task, forward_target: np.ndarray, forward_return: np.ndarray,
                 transform: Transform) -> np.ndarray:
    """What the task learns per row (the task decides: scaled return or volatility, up-indicator, class id)."""
    return task.make_targets(np.nan_to_num(forward_target), np.nan_to_num(forward_return), transform.target_scale(),
                             transform.dead_zone)


@dataclass(frozen=True)
class VolatilityPlan:
    """The volatility part of a run's rows: the history windows (None: neither volatility target nor inputs) and
    the volatility inputs (None: off)."""
    history: features.HistoryWindows | None = None
    inputs: features.VolatilityInputs | None = None

    @classmethod
    def for_training(cls, data: DataConfig, source: BarSource) -> "VolatilityPlan":
        """From the config and the bars: windows from the bars' spacing, range estimators where bars have a range."""
        if data.target != "volatility" and not data.with_volatility_features:
            return cls()
        history, note = features.HistoryWindows.for_spacing(source.bar_spacing, data.horizon,
                                                            min(source.lengths.values(), default=None))
        log.info("volatility history windows: %s (median bar step %s)", note,
                 "unknown" if source.bar_spacing is None else pd.Timedelta(source.bar_spacing))
        if not data.with_volatility_features:
            return cls(history)
        if not source.has_range:
            log.warning("volatility inputs: range estimators (%s) left out: no bar has its high above its low, so "
                        "the bars carry no intrabar range (a close-only file, high and low mapped to its close)",
                        ", ".join(features.RANGE_NAMES))
        return cls(history, features.VolatilityInputs(history, source.has_range))

    @classmethod
    def of_transform(cls, transform: Transform) -> "VolatilityPlan":
        """What a saved run was trained with: its windows, and its inputs as its feature names list them."""
        history = transform.history()
        if history is None or features.REALIZED_NAMES[0] not in transform.features:
            return cls(history)
        return cls(history, features.VolatilityInputs(history, features.RANGE_NAMES[0] in transform.features))

    def warmup(self, data: DataConfig) -> int:
        return features.warmup_bars(data.return_lags, data.volatility_windows, self.inputs, self.history)


def _series_rows(frame: pd.DataFrame, data: DataConfig, extra_columns: list[str], warmup: int,
                 plan: VolatilityPlan = VolatilityPlan()) -> dict[str, np.ndarray]:
    """One symbol's features and raw targets, warm-up rows dropped."""
    observed = features.observed_features(frame, data.return_lags, data.volatility_windows, plan.inputs)
    if extra_columns:
        observed = np.concatenate([observed, frame[extra_columns].to_numpy(np.float32)], axis=1)
    close = frame["close"].to_numpy()
    forward_return = features.forward_log_return(close, data.horizon)
    forward_target = (features.forward_realized_volatility(close, data.horizon) if data.target == "volatility"
                      else forward_return)
    rows = {"observed": observed[warmup:], "known": features.known_features(frame["timestamp"])[warmup:],
            "forward_return": forward_return[warmup:], "forward_target": forward_target[warmup:],
            "timestamp": frame["timestamp"].to_numpy("datetime64[ns]")[warmup:]}
    if plan.history is not None:
        log_close = np.log(close.astype(np.float64))
        rows["history"] = np.stack([features.trailing_realized_volatility(log_close, w)
                                    for w in plan.history.windows], axis=1)[warmup:].astype(np.float32)
    return rows


def _check_finite(rows: dict[str, np.ndarray], names: list[str], symbol: str) -> None:
    bad = ~np.isfinite(rows["observed"])
    if bad.any():
        counts = ", ".join(f"{names[j]} {int(n)}" for j, n in enumerate(bad.sum(axis=0)) if n)
        raise UserError(f"symbol {symbol!r}: non-finite feature values after the warm-up (per feature: {counts}); "
                         "check the bars of that symbol (zero or negative prices, constant stretches)")


def build_data(cfg: Config, bars: pd.DataFrame | None = None) -> DataBundle:
    """Turn long-format bars (timestamp, symbol, OHLCV, extra columns) into the three window sets of `cfg.task`."""
    data = cfg.data
    source = bar_source(cfg, bars)
    plan = VolatilityPlan.for_training(data, source)
    warmup = plan.warmup(data)
    names = features.observed_feature_names(data.return_lags, data.volatility_windows, plan.inputs) + source.extra_columns
    history_parts: list[np.ndarray] = []
    total = sum(max(n - warmup, 0) for n in source.lengths.values())
    buffer = SeriesBuffer(total, len(names), len(features.KNOWN_FEATURES), data.memory_map_dir)
    moments = RunningMoments(len(names))
    ends: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    symbols: list[str] = []
    skipped: list[str] = []
    cuts = time_cuts(data, source.time_range)
    rule = cuts.describe() + " for every symbol" if cuts else _split_rule(data)
    for symbol, frame in source.frames():
        rows = _series_rows(frame, data, source.extra_columns, warmup, plan)
        n = len(rows["observed"])
        bounds = split_bounds(n, data, rows["timestamp"], cuts)
        per_split = {s: sample_ends_in(lo, hi, data.sequence_length, data.horizon) for s, (lo, hi) in bounds.items()}
        if cuts is not None and len(per_split["train"]) == 0:
            # shared cut dates: a symbol listed after the train period has nothing to learn from; the others go on
            log.warning("left out symbol %r: no training window before %s (its %d bars start at %s)", symbol,
                        pd.Timestamp(cuts.val_start), len(frame), frame["timestamp"].iloc[0] if len(frame) else "-")
            skipped.append(symbol)
            continue
        if cuts is None and any(len(v) == 0 for v in per_split.values()):
            _too_short(symbol, len(frame), warmup, per_split, data)
            skipped.append(symbol)
            continue
        _check_finite(rows, names, symbol)
        offset = buffer.append(rows, len(symbols))
        if "history" in rows:
            history_parts.append(rows["history"])
        moments.add(rows["observed"][bounds["train"][0]:bounds["train"][1]])
        for s in SPLITS:
            ends[s].append(per_split[s] + offset)
        symbols.append(symbol)
    if not symbols:
        raise UserError(
            f"every symbol is too short and was skipped ({', '.join(skipped) or 'no bars'}): with sequence_length="
            f"{data.sequence_length}, horizon={data.horizon} and {warmup} warm-up bars, a split ({rule}) "
            "holds no window in any of them; give more bars or lower data.sequence_length")
    if skipped:
        why = "no training window before the shared cut" if cuts else "too short (data.too_short=skip)"
        log.warning("left out %d of %d symbols, %s: %s; training on %d: %s", len(skipped),
                    len(skipped) + len(symbols), why, ", ".join(skipped), len(symbols), ", ".join(symbols))
    log.info("features: %d observed (%d passed through from the data) + %d known per bar; dropped the first %d bars "
             "of each of %d series as feature warm-up", len(names), len(source.extra_columns),
             len(features.KNOWN_FEATURES), warmup, len(symbols))

    arrays = buffer.finish()
    arrays.history = np.concatenate(history_parts) if history_parts else None
    split_ends = {s: np.concatenate(ends[s]) for s in SPLITS}
    empty = [s for s in SPLITS if len(split_ends[s]) == 0]
    if empty:
        raise UserError(f"no symbol has a window in the {' or '.join(empty)} split ({rule}; sequence_length="
                        f"{data.sequence_length}, horizon={data.horizon}): give more bars, lower "
                        "data.sequence_length, or change val_fraction / test_fraction")
    train_target = buffer.forward_target[split_ends["train"]].astype(np.float64)
    train_abs_return = np.abs(buffer.forward_return[split_ends["train"]].astype(np.float64))
    volatility = data.target == "volatility"
    task = tasks.for_config(cfg)
    if task.log_target:   # log volatility, centred on its train mean, not scaled: QLIKE needs log units
        train_target = np.log(np.maximum(train_target, tasks.VOL_FLOOR))
    transform = Transform(
        task=cfg.task, target=data.target, sequence_length=data.sequence_length, horizon=data.horizon,
        features=names, known_features=list(features.KNOWN_FEATURES), extra_columns=source.extra_columns,
        symbols=symbols, mean=moments.mean.tolist(), std=moments.std().tolist(),
        target_mean=float(train_target.mean()) if volatility else 0.0,
        target_std=1.0 if task.log_target else (float(train_target.std()) or 1.0),
        dead_zone=float(np.quantile(train_abs_return, data.flat_fraction)) if data.flat_fraction else 0.0,
        binary_dead_zone=float(np.quantile(train_abs_return, data.binary_dead_zone)) if data.binary_dead_zone else 0.0,
        history_windows=list(plan.history.windows) if plan.history else [], target_log=task.log_target,
    )
    transform.scale(buffer.observed)
    buffer.set_target(make_targets(task, buffer.forward_target, buffer.forward_return, transform))
    if transform.binary_dead_zone:
        split_ends = _leave_out_dead_zone(split_ends, buffer.forward_return, transform.binary_dead_zone, data)
    from .windows import WindowSet  # torch: here, so that the torch-free ONNX serving path can import this module
    splits = {s: WindowSet(arrays, split_ends[s], data.sequence_length, data.horizon) for s in SPLITS}
    log.info("samples: train %d, val %d, test %d (%s; sequence_length %d, horizon %d, purge gap %d)",
             len(splits["train"]), len(splits["val"]), len(splits["test"]), rule, data.sequence_length,
             data.horizon, data.effective_purge_gap)
    return DataBundle(splits=splits, transform=transform)


def _split_rule(data: DataConfig) -> str:
    if data.walk_forward_folds:
        return (f"walk-forward fold {data.fold} of {data.walk_forward_folds}, val_fraction={data.val_fraction:g}, "
                f"test_fraction={data.test_fraction:g}")
    if data.val_start is not None:
        return f"val from {data.val_start}, test from {data.test_start}"
    return f"val_fraction={data.val_fraction:g}, test_fraction={data.test_fraction:g}"


def _too_short(symbol: str, num_bars: int, warmup: int, per_split: dict[str, np.ndarray], data: DataConfig) -> None:
    counts = ", ".join(f"{s} {len(v)}" for s, v in per_split.items())
    message = (f"symbol {symbol!r} has {num_bars} bars: after {warmup} warm-up bars, sequence_length="
               f"{data.sequence_length} and horizon={data.horizon} leave samples {counts} ({_split_rule(data)}); "
               "every split needs at least one")
    if data.too_short == "error":
        raise UserError(f"{message}: give more bars, lower data.sequence_length, or set data.too_short=skip to "
                         "leave such symbols out")
    log.warning("skipped %s (data.too_short=skip)", message)


def _leave_out_dead_zone(split_ends: dict[str, np.ndarray], forward_return: np.ndarray, threshold: float,
                         data: DataConfig) -> dict[str, np.ndarray]:
    kept = {s: e[np.abs(forward_return[e]) > threshold] for s, e in split_ends.items()}
    log.info("binary dead zone: left out the samples with |return| <= %.3g (the smallest %g of train): %s",
             threshold, data.binary_dead_zone,
             ", ".join(f"{s} {len(split_ends[s]) - len(kept[s])} of {len(split_ends[s])}" for s in SPLITS))
    if any(len(v) == 0 for v in kept.values()):
        raise UserError(f"data.binary_dead_zone={data.binary_dead_zone:g} leaves a split without samples; lower it")
    return kept


@dataclass
class PredictionData:
    """Windows over every bar of new data (the last ones included) with the run's own transform applied."""
    windows: WindowSet
    target_known: np.ndarray   # (num samples,) bool: the bar `horizon` ahead is in the data (False at the end)
    transform: Transform

    def timestamps(self) -> np.ndarray:
        return self.windows.arrays.timestamp.index_select(0, self.windows.sample_ends).numpy().view("datetime64[ns]")


@dataclass
class PredictionRows:
    """PredictionData's numpy content, before any tensor: what the torch-free ONNX serving path reads."""
    rows: RowArrays
    sample_ends: np.ndarray    # (num samples,) int64: the row of each sample's last bar
    target_known: np.ndarray   # (num samples,) bool: the bar `horizon` ahead is in the data (False at the end)
    history: np.ndarray | None = None   # (N, 4) float32 per row: SeriesArrays.history


def build_prediction_data(cfg: Config, transform: Transform, bars: pd.DataFrame | None = None) -> PredictionData:
    """Samples ending at every bar that has a full window, scaled with the run's transform (prediction_rows)."""
    found = prediction_rows(cfg, transform, bars)
    from .windows import SeriesArrays, WindowSet  # torch: as in build_data
    arrays = SeriesArrays.from_rows(found.rows)
    arrays.history = found.history
    windows = WindowSet(arrays, found.sample_ends, transform.sequence_length, transform.horizon)
    return PredictionData(windows, found.target_known, transform)


def prediction_rows(cfg: Config, transform: Transform, bars: pd.DataFrame | None = None) -> PredictionRows:
    """Samples ending at every bar that has a full window, scaled with the run's transform. The calendar inputs
    of the `horizon` bars after the last one are extrapolated with the symbol's usual (median) bar step."""
    data = cfg.data
    source = bar_source(cfg, bars)
    if source.extra_columns != transform.extra_columns:
        raise UserError(
            "the data's extra columns differ from the run's: the run was trained on "
            f"[{', '.join(transform.extra_columns)}], the data has [{', '.join(source.extra_columns)}] (missing: "
            f"{', '.join(sorted(set(transform.extra_columns) - set(source.extra_columns))) or '-'}; not in training: "
            f"{', '.join(sorted(set(source.extra_columns) - set(transform.extra_columns))) or '-'})")
    unknown = sorted(set(source.lengths) - set(transform.symbols))
    if unknown:
        raise UserError(f"symbol(s) {', '.join(unknown[:20])} were not in the run's training data; the model knows "
                         f"{', '.join(transform.symbols)} (each symbol has its own learned embedding)")
    plan = VolatilityPlan.of_transform(transform)
    warmup = plan.warmup(data)
    horizon, length = transform.horizon, transform.sequence_length
    total = sum(max(n - warmup, 0) + horizon for n in source.lengths.values())
    buffer = SeriesBuffer(total, len(transform.features), len(transform.known_features), data.memory_map_dir)
    ends, known_target, history_parts = [], [], []
    for symbol, frame in source.frames():
        rows = _series_rows(frame, data, source.extra_columns, warmup, plan)
        n = len(rows["observed"])
        if n < length:
            message = (f"symbol {symbol!r} has {len(frame)} bars, fewer than the {warmup} warm-up bars + "
                       f"sequence_length={length} that one prediction needs")
            if data.too_short == "error":
                raise UserError(f"{message}; give more bars, or set data.too_short=skip")
            log.warning("skipped %s (data.too_short=skip)", message)
            continue
        _check_finite(rows, transform.features, symbol)
        offset = buffer.append(_with_future_rows(rows, horizon), transform.symbols.index(symbol))
        if "history" in rows:
            history_parts.append(np.concatenate([rows["history"], np.full((horizon, 4), np.nan, np.float32)]))
        symbol_ends = np.arange(length - 1, n, dtype=np.int64)
        ends.append(symbol_ends + offset)
        known_target.append(symbol_ends <= n - 1 - horizon)
    if not ends:
        raise UserError("no symbol has enough bars for one prediction")
    buffer.trim()
    transform.scale(buffer.observed)
    target = make_targets(tasks.for_transform(transform), buffer.forward_target, buffer.forward_return, transform)
    return PredictionRows(buffer.rows(target), np.concatenate(ends), np.concatenate(known_target),
                          np.concatenate(history_parts) if history_parts else None)


def _with_future_rows(rows: dict[str, np.ndarray], horizon: int) -> dict[str, np.ndarray]:
    """`horizon` rows after the last bar: calendar inputs of the extrapolated times, no observations, no target."""
    stamps = rows["timestamp"]
    step = np.median(np.diff(stamps)) if len(stamps) > 1 else np.timedelta64(1, "D")
    future = stamps[-1] + step * np.arange(1, horizon + 1)
    pad = np.full(horizon, np.nan, np.float32)
    return {"observed": np.concatenate([rows["observed"], np.zeros((horizon, rows["observed"].shape[1]), np.float32)]),
            "known": np.concatenate([rows["known"], features.known_features(pd.Series(future))]),
            "forward_return": np.concatenate([rows["forward_return"], pad]),
            "forward_target": np.concatenate([rows["forward_target"], pad]),
            "timestamp": np.concatenate([stamps, future])}
