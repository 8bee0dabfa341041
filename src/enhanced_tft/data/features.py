"""Features from OHLCV bars, per symbol and vectorised, plus known-future calendar features.

Observed inputs (known only up to the bar itself):
  ret_{k}        log(close[t] / close[t-k]) for each k in `return_lags`
  vol_{w}        rolling std of 1-bar log returns over w bars, for each w in `volatility_windows`
  range          log(high / low)
  close_location (close - low) / (high - low) - 1/2, in [-1/2, 1/2]
  volume_z       z-score of log volume against its trailing 20-bar mean and std
Known-future inputs (calendar, known for every bar ahead): sin/cos of hour of day and day of week.
The first `warmup_bars` rows of each series lack full history; the pipeline drops them and says so.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

VOLUME_WINDOW = 20
KNOWN_FEATURES = ("hour_sin", "hour_cos", "dow_sin", "dow_cos")


def observed_feature_names(return_lags: list[int], volatility_windows: list[int]) -> list[str]:
    return ([f"ret_{k}" for k in return_lags] + [f"vol_{w}" for w in volatility_windows]
            + ["range", "close_location", "volume_z"])


def warmup_bars(return_lags: list[int], volatility_windows: list[int]) -> int:
    """Rows at the start of each series whose features need more history than exists."""
    return max(max(return_lags), max(volatility_windows) + 1, VOLUME_WINDOW)


def observed_features(bars: pd.DataFrame, return_lags: list[int], volatility_windows: list[int]) -> np.ndarray:
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
    return np.stack(columns, axis=1).astype(np.float32)


def known_features(timestamps: pd.Series) -> np.ndarray:
    """(N, F_known) float32 calendar features: known in advance for any future bar."""
    ts = pd.DatetimeIndex(timestamps)
    hour = (ts.hour.to_numpy() + ts.minute.to_numpy() / 60.0) / 24.0
    dow = ts.day_of_week.to_numpy() / 7.0
    return np.stack([np.sin(2 * np.pi * hour), np.cos(2 * np.pi * hour),
                     np.sin(2 * np.pi * dow), np.cos(2 * np.pi * dow)], axis=1).astype(np.float32)


def forward_log_return(close: np.ndarray, horizon: int) -> np.ndarray:
    """log(close[t + horizon] / close[t]) aligned to row t; NaN for the last `horizon` rows."""
    log_close = np.log(close.astype(np.float64))
    out = np.full_like(log_close, np.nan)
    out[:-horizon] = log_close[horizon:] - log_close[:-horizon]
    return out.astype(np.float32)
