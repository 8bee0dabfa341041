"""The baselines a volatility forecaster is judged against, beside LightGBM and the naive rule (data.target=volatility).

- persistence: the realized volatility of the last `horizon` bars, sqrt(mean of their squared 1-bar log returns)
  (the target's own definition, looking back instead of ahead), as the forecast of the next `horizon` bars';
- HAR on logs (Corsi 2009): OLS of log(target) on a constant and the log realized volatility of the last day, week
  and month of bars (data/features.py HistoryWindows), fitted on the train split's samples only; the forecast is
  exp(fitted log), with no log-normal bias correction: it is a median forecast, as the model's log-volatility
  losses give one.

Both read the raw trailing realized volatilities the pipeline keeps per row (DataBundle.history, computed causally
per symbol from closes up to the row itself) at the very samples the model is scored on, and are scored with the
same volatility metrics (tasks.volatility_metrics: QLIKE, MSE of log volatility) plus MAE and RMSE.

Legend: N rows, S samples.
"""
from __future__ import annotations

import numpy as np

from ..tasks import VOL_FLOOR, volatility_metrics

PERSISTENCE_RULE = "persistence: realized volatility of the last horizon bars"
HAR_RULE = ("HAR on logs (Corsi 2009): OLS of log target on log realized volatility over a day, week and month of "
            "bars, fitted on train; exp of the fitted log, no bias correction")
LABELS = {"persistence": "persistence", "har": "HAR"}


def point_metrics(forecast_S: np.ndarray, actual_S: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, QLIKE and MSE of log volatility of volatility forecasts, in the target's units."""
    forecast, actual = np.asarray(forecast_S, np.float64), np.asarray(actual_S, np.float64)
    error = forecast - actual
    return {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
            **volatility_metrics(forecast, actual), "num_samples": int(len(actual))}


def persistence(history_N4: np.ndarray, ends_S: np.ndarray) -> np.ndarray:
    """(S,) the realized volatility of the `horizon` bars up to each sample's last bar."""
    return history_N4[ends_S, 0].astype(np.float64)


def _har_design(history_N4: np.ndarray, ends_S: np.ndarray) -> np.ndarray:
    """(S, 4): a constant and the log realized volatility over a day, a week and a month of bars."""
    logs = np.log(np.maximum(history_N4[ends_S, 1:].astype(np.float64), VOL_FLOOR))
    return np.concatenate([np.ones((len(ends_S), 1)), logs], axis=1)


def fit_har(history_N4: np.ndarray, target_N: np.ndarray, train_ends_S: np.ndarray) -> list[float]:
    """The HAR's coefficients (constant, day, week, month) by least squares on the train samples."""
    design = _har_design(history_N4, train_ends_S)
    log_target = np.log(np.maximum(target_N[train_ends_S].astype(np.float64), VOL_FLOOR))
    coefficients, *_ = np.linalg.lstsq(design, log_target, rcond=None)
    return [float(c) for c in coefficients]


def har(coefficients: list[float], history_N4: np.ndarray, ends_S: np.ndarray) -> np.ndarray:
    """(S,) HAR forecasts of volatility: exp(constant + b_d log RV_day + b_w log RV_week + b_m log RV_month)."""
    return np.exp(_har_design(history_N4, ends_S) @ np.asarray(coefficients, np.float64))


def baselines(history_N4: np.ndarray, target_N: np.ndarray, ends_S: np.ndarray,
              coefficients: list[float]) -> dict[str, dict]:
    """What summary.json keeps as `volatility_baselines`: each rule and its metrics on the samples ending at
    `ends_S`, whose realized volatility is `target_N[ends_S]`; HAR with `coefficients` (fit_har on the train split)."""
    actual = target_N[ends_S]
    return {"persistence": {"rule": PERSISTENCE_RULE, "test": point_metrics(persistence(history_N4, ends_S), actual)},
            "har": {"rule": HAR_RULE, "coefficients": coefficients, "bias_correction": False,
                    "test": point_metrics(har(coefficients, history_N4, ends_S), actual)}}


def of_split(history_N4: np.ndarray | None, windows, train_windows) -> dict[str, dict] | None:
    """The volatility baselines on `windows`, HAR fitted on `train_windows` (None without a volatility history)."""
    if history_N4 is None:
        return None
    raw_N = windows.arrays.raw_return.numpy()
    coefficients = fit_har(history_N4, raw_N, train_windows.sample_ends.numpy())
    return baselines(history_N4, raw_N, windows.sample_ends.numpy(), coefficients)


def tested(card: dict) -> list[tuple[str, dict]]:
    """(label, test metrics) of each volatility baseline in a scorecard (summary.json's or `etft evaluate`'s)."""
    found = card.get("volatility_baselines") or {}
    return [(LABELS[name], found[name]["test"]) for name in LABELS if name in found]
