"""Features from OHLCV bars, per symbol and vectorised, plus known-future calendar features.

Observed inputs (known only up to the bar itself):
  ret_{k}        log(close[t] / close[t-k]) for each k in `return_lags`
  vol_{w}        rolling std of 1-bar log returns over w bars, for each w in `volatility_windows`
  range          log(high / low)
  close_location (close - low) / (high - low) - 1/2, in [-1/2, 1/2]
  volume_z       z-score of log volume against its trailing 20-bar mean and std
  rsi_14         Wilder's relative strength index over 14 bars, as RSI/100 - 1/2, in [-1/2, 1/2]
  atr_14         Wilder's average true range over 14 bars, divided by the close (scale-free)
  <extra>        the file's extra numeric columns (data.extra_columns), as they are
Volatility inputs (data.volatility_features; on by default for data.target=volatility), see `VolatilityInputs`,
each as the log of a volatility (floored at 1e-6: a flat stretch has none), since volatility is log-normal-ish:
  rv_day, rv_week, rv_month   log trailing realized volatility, sqrt(mean r^2) over a day, a week and a month of bars
  parkinson, garman_klass, rogers_satchell
                 log range-based volatility from each bar's OHLC: the per-bar variance estimator averaged over the
                 last `horizon` bars, square-rooted; left out for data whose bars carry no high-low range
Known-future inputs (calendar, known for every bar ahead): sin/cos of hour of day and day of week.
The first `warmup_bars` rows of each series lack full history; the pipeline drops them and says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

VOLUME_WINDOW = 20
WILDER_WINDOW = 14   # RSI and ATR, Wilder's standard smoothing 1/14
LOG_FLOOR = 1e-6     # volatility inputs are floored here before their log (tasks.VOL_FLOOR for the target)
KNOWN_FEATURES = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")


REALIZED_NAMES = ("rv_day", "rv_week", "rv_month")
RANGE_NAMES = ("parkinson", "garman_klass", "rogers_satchell")
DAY_SECONDS = 86_400.0


def observed_feature_names(return_lags: list[int], volatility_windows: list[int],
                           volatility: "VolatilityInputs | None" = None) -> list[str]:
    names = ([f"ret_{k}" for k in return_lags] + [f"vol_{w}" for w in volatility_windows]
             + ["range", "close_location", "volume_z", f"rsi_{WILDER_WINDOW}", f"atr_{WILDER_WINDOW}"])
    return names + (volatility.names() if volatility is not None else [])


def warmup_bars(return_lags: list[int], volatility_windows: list[int], volatility: "VolatilityInputs | None" = None,
                history: "HistoryWindows | None" = None) -> int:
    """Rows at the start of each series whose features (and volatility baselines' regressors) need more history
    than exists."""
    longest = max(max(return_lags), max(volatility_windows) + 1, VOLUME_WINDOW, WILDER_WINDOW + 1)
    if history is not None:   # a window of w squared returns needs w + 1 closes
        longest = max(longest, max(history.windows) + 1)
    return longest


@dataclass(frozen=True)
class HistoryWindows:
    """Bars in a day, a week and a month of this data, and the forecast horizon: the windows of the trailing
    realized volatilities that the volatility inputs and the persistence and HAR baselines use."""
    horizon: int
    day: int
    week: int
    month: int

    @property
    def windows(self) -> tuple[int, int, int, int]:
        return (self.horizon, self.day, self.week, self.month)

    @classmethod
    def for_spacing(cls, bar_spacing: np.timedelta64 | None, horizon: int, num_bars: int | None = None
                    ) -> tuple["HistoryWindows", str]:
        """From the median bar spacing: bars of a day or longer count trading days (1/5/22), intraday bars count
        calendar time (hourly: 24/168/720; 24/7 markets). Windows longer than a quarter of the shortest series
        (`num_bars`) are cut to that, so that the warm-up leaves rows to train on; the note says what was chosen."""
        seconds = None if bar_spacing is None else float(bar_spacing / np.timedelta64(1, "s"))
        if seconds is None or seconds <= 0 or seconds >= 0.9 * DAY_SECONDS:
            day, week, month = 1, 5, 22
        else:
            day = max(int(round(DAY_SECONDS / seconds)), 1)
            week, month = 7 * day, 30 * day
        wanted = (day, week, month)
        if num_bars is not None:
            cap = max(num_bars // 4, 1)
            day, week, month = (min(w, cap) for w in wanted)
        note = f"day/week/month = {day}/{week}/{month} bars"
        if (day, week, month) != wanted:
            note += (f" (cut from {wanted[0]}/{wanted[1]}/{wanted[2]}: the shortest series has {num_bars} bars, "
                     "a window may take at most a quarter of them)")
        return cls(horizon, day, week, month), note


@dataclass(frozen=True)
class VolatilityInputs:
    """Which volatility inputs a run has: trailing realized volatility over `history`'s day, week and month, and the
    range estimators (averaged over `history.horizon` bars) where the bars carry a high-low range."""
    history: HistoryWindows
    with_range: bool

    def names(self) -> list[str]:
        return list(REALIZED_NAMES) + (list(RANGE_NAMES) if self.with_range else [])

    def columns(self, bars: pd.DataFrame) -> list[np.ndarray]:
        """The inputs of one symbol's bars (sorted by time), each (N,) float64, NaN during their warm-up."""
        log_close = np.log(bars["close"].to_numpy(np.float64))
        out = [trailing_realized_volatility(log_close, w) for w in (self.history.day, self.history.week,
                                                                    self.history.month)]
        if self.with_range:
            out += [np.sqrt(_trailing_mean(v, self.history.horizon)) for v in range_variances(bars)]
        return [np.log(np.maximum(v, LOG_FLOOR)) for v in out]   # maximum keeps the warm-up NaN (fmax would not)


def has_range(bars: pd.DataFrame) -> bool:
    """Whether the bars carry intrabar range information: some bar's high above its low. A close-only file read
    with high and low mapped to its close (data.columns) has none."""
    return bool((bars["high"].to_numpy() > bars["low"].to_numpy()).any())


def range_variances(bars: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bar variance estimators from OHLC (one bar's log-price variance each): Parkinson (1980), Garman-Klass
    (1980) and Rogers-Satchell (1991, drift-free)."""
    o, h, l, c = (np.log(bars[k].to_numpy(np.float64)) for k in ("open", "high", "low", "close"))
    hl, co = h - l, c - o
    parkinson = hl ** 2 / (4.0 * np.log(2.0))
    garman_klass = np.maximum(0.5 * hl ** 2 - (2.0 * np.log(2.0) - 1.0) * co ** 2, 0.0)
    rogers_satchell = np.maximum((h - c) * (h - o) + (l - c) * (l - o), 0.0)
    return parkinson, garman_klass, rogers_satchell


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    return pd.Series(values).rolling(window, min_periods=window).mean().to_numpy()


def trailing_realized_volatility(log_close: np.ndarray, window: int) -> np.ndarray:
    """sqrt(mean of the squared 1-bar log returns of bars t-window+1 .. t), aligned to row t: the target's
    definition over the past instead of the future; NaN for the first `window` rows."""
    squared = np.concatenate([[np.nan], np.diff(log_close) ** 2])        # row t: r[t]^2
    return np.sqrt(_trailing_mean(squared, window))


def observed_features(bars: pd.DataFrame, return_lags: list[int], volatility_windows: list[int],
                      volatility: VolatilityInputs | None = None) -> np.ndarray:
    """(N, F_obs) float32 for one symbol's bars, sorted by time; NaN during the warm-up rows."""
    log_close = np.log(bars["close"].to_numpy(np.float64))
    columns = []
    for k in return_lags:
        lagged = np.full_like(log_close, np.nan)
        lagged[k:] = log_close[k:] - log_close[:-k]
        columns.append(lagged)
    one_bar = pd.Series(np.concatenate([[np.nan], np.diff(log_close)]))
    for w in volatility_windows:
        columns.append(one_bar.rolling(w, min_periods=w).std().to_numpy())
    high = bars["high"].to_numpy(np.float64)
    low = bars["low"].to_numpy(np.float64)
    close = bars["close"].to_numpy(np.float64)
    columns.append(np.log(high / low))
    span = high - low
    columns.append(np.where(span > 0, (close - low) / np.where(span > 0, span, 1.0), 0.5) - 0.5)
    log_volume = pd.Series(np.log1p(bars["volume"].to_numpy(np.float64)))
    mean = log_volume.rolling(VOLUME_WINDOW, min_periods=VOLUME_WINDOW).mean()
    std = log_volume.rolling(VOLUME_WINDOW, min_periods=VOLUME_WINDOW).std()
    columns.append(((log_volume - mean) / std.where(std > 0, 1.0)).to_numpy())
    columns.append(_rsi(close))
    columns.append(_atr(high, low, close) / close)
    if volatility is not None:
        columns += volatility.columns(bars)
    return np.stack(columns, axis=1).astype(np.float32)


def _wilder(values: np.ndarray) -> np.ndarray:
    """Wilder's smoothing (an EMA with alpha 1/14); NaN until 14 values have been seen."""
    return pd.Series(values).ewm(alpha=1.0 / WILDER_WINDOW, adjust=False, min_periods=WILDER_WINDOW).mean().to_numpy()


def _rsi(close: np.ndarray) -> np.ndarray:
    """RSI/100 - 1/2 from Wilder-smoothed gains and losses of the close; 0 (RSI 50) on a flat stretch."""
    change = np.concatenate([[np.nan], np.diff(close)])
    gain = _wilder(np.where(np.isnan(change), np.nan, np.maximum(change, 0.0)))
    loss = _wilder(np.where(np.isnan(change), np.nan, np.maximum(-change, 0.0)))
    total = gain + loss
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(total > 0, gain / np.where(total > 0, total, 1.0), 0.5)
    return np.where(np.isnan(total), np.nan, share - 0.5)


def _atr(high: np.ndarray, low: np.ndarray, close: np.ndarray) -> np.ndarray:
    """Wilder-smoothed true range: max(high - low, |high - previous close|, |low - previous close|)."""
    previous = np.concatenate([[np.nan], close[:-1]])
    true_range = np.fmax(high - low, np.fmax(np.abs(high - previous), np.abs(low - previous)))
    true_range[0] = np.nan
    return _wilder(true_range)


def known_features(timestamps: pd.Series) -> np.ndarray:
    """(N, F_known) float32 calendar features: known in advance for any future bar."""
    ts = pd.DatetimeIndex(timestamps)
    hour = (ts.hour.to_numpy() + ts.minute.to_numpy() / 60.0) / 24.0
    dow = ts.day_of_week.to_numpy() / 7.0
    return np.stack([np.sin(2 * np.pi * hour), np.cos(2 * np.pi * hour),
                     np.sin(2 * np.pi * dow), np.cos(2 * np.pi * dow)], axis=1).astype(np.float32)


def forward_realized_volatility(close: np.ndarray, horizon: int) -> np.ndarray:
    """sqrt(mean of the squared 1-bar log returns of bars t+1 .. t+horizon), aligned to row t; NaN at the end."""
    log_close = np.log(close.astype(np.float64))
    squared = np.concatenate([np.diff(log_close) ** 2, [np.nan]])       # row t: r[t+1]^2
    out = pd.Series(squared[::-1]).rolling(horizon, min_periods=horizon).mean().to_numpy()[::-1]
    return np.sqrt(out).astype(np.float32)


def forward_log_return(close: np.ndarray, horizon: int) -> np.ndarray:
    """log(close[t + horizon] / close[t]) aligned to row t; NaN for the last `horizon` rows."""
    log_close = np.log(close.astype(np.float64))
    out = np.full_like(log_close, np.nan)
    out[:-horizon] = log_close[horizon:] - log_close[:-horizon]
    return out.astype(np.float32)
