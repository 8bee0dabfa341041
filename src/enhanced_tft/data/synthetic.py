"""Deterministic synthetic multi-symbol market with a planted, partly predictable component.

Per symbol, normalised returns u follow a Gaussian AR(3) with equal coefficients `SIGNAL_COEF`:
    u[t] = c * (u[t-1] + u[t-2] + u[t-3]) + e[t],   e ~ N(0, 1)
and the log return is r[t] = sigma[t-1] * u[t], where sigma combines a two-state Markov regime
(calm / turbulent) with a persistent log-volatility AR(1): volatility clustering and regimes.
Since sigma > 0, the direction of r[t+1] is the direction of u[t+1], and the best any model can do
from the past is sign(u[t] + u[t-1] + u[t-2]). Its accuracy, ORACLE_DIRECTION_ACCURACY, is exact for
the stationary process (Yule-Walker, then P(same sign) = 1/2 + arcsin(rho)/pi) and is about 0.600.
Volume rises with volatility and |u|; high/low wrap open/close by a half-volatility excursion.
Everything is vectorised (scipy's lfilter for the AR parts), so it scales to any size for benchmarks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

SIGNAL_COEF = 0.15
_BASE_VOL = 0.006          # per-bar volatility of a calm regime, before the symbol's own factor
_TURBULENT_FACTOR = 2.2    # volatility multiplier in the turbulent regime
_REGIME_SWITCH_PROB = 0.01 # per bar
_LOGVOL_PERSISTENCE = 0.97
_LOGVOL_NOISE = 0.08
_BURN_IN = 200             # bars discarded so that every series starts stationary


def oracle_direction_accuracy(coef: float = SIGNAL_COEF) -> float:
    """Best achievable direction accuracy for the AR(3) return process with equal coefficients."""
    p = coef
    system = np.array([
        [1.0, -p, -p, -p],
        [-p, 1.0 - p, -p, 0.0],
        [-p, -2.0 * p, 1.0, 0.0],
        [-p, -p, -p, 1.0],
    ])
    gamma = np.linalg.solve(system, [1.0, 0.0, 0.0, 0.0])
    var_sum3 = 3 * gamma[0] + 4 * gamma[1] + 2 * gamma[2]
    var_signal = p * p * var_sum3
    rho = np.sqrt(var_signal / (var_signal + 1.0))
    return float(0.5 + np.arcsin(rho) / np.pi)


ORACLE_DIRECTION_ACCURACY = oracle_direction_accuracy()


def _regimes(rng: np.random.Generator, n: int) -> np.ndarray:
    """0 = calm, 1 = turbulent; switches with a fixed probability per bar."""
    switches = rng.random(n) < _REGIME_SWITCH_PROB
    return (np.cumsum(switches) + rng.integers(0, 2)) % 2


def generate_symbol(seed: int, index: int, num_bars: int, with_signal: bool = False) -> dict[str, np.ndarray]:
    """Arrays of one symbol's bars; the same (seed, index) always gives the same bars."""
    from scipy.signal import lfilter  # 1.5 s to import: paid only when synthetic bars are made

    rng = np.random.default_rng([seed, index])
    n = num_bars + _BURN_IN
    shocks = rng.standard_normal(n)
    u = lfilter([1.0], [1.0, -SIGNAL_COEF, -SIGNAL_COEF, -SIGNAL_COEF], shocks)
    log_vol = lfilter([1.0], [1.0, -_LOGVOL_PERSISTENCE], _LOGVOL_NOISE * rng.standard_normal(n))
    symbol_factor = float(np.exp(rng.uniform(-0.4, 0.4)))
    sigma = _BASE_VOL * symbol_factor * np.where(_regimes(rng, n) == 1, _TURBULENT_FACTOR, 1.0) * np.exp(log_vol)
    sigma_prev = np.concatenate([[sigma[0]], sigma[:-1]])
    log_ret = sigma_prev * u
    # predictable part of u[t+1] given bars up to t: the planted signal, aligned to bar t
    signal_next = SIGNAL_COEF * (u + np.concatenate([[0.0], u[:-1]]) + np.concatenate([[0.0, 0.0], u[:-2]]))

    sl = slice(_BURN_IN, None)
    log_ret, sigma_prev, u, signal_next = log_ret[sl], sigma_prev[sl], u[sl], signal_next[sl]
    start_price = float(np.exp(rng.uniform(np.log(20.0), np.log(500.0))))
    close = start_price * np.exp(np.cumsum(log_ret))
    open_ = np.concatenate([[start_price], close[:-1]]) * np.exp(0.1 * sigma_prev * rng.standard_normal(num_bars))
    excursion_up = np.abs(rng.standard_normal(num_bars)) * 0.5 * sigma_prev
    excursion_down = np.abs(rng.standard_normal(num_bars)) * 0.5 * sigma_prev
    high = np.maximum(open_, close) * np.exp(excursion_up)
    low = np.minimum(open_, close) * np.exp(-excursion_down)
    log_volume = (12.0 + rng.uniform(-1, 1) + 1.5 * np.log(sigma_prev / (_BASE_VOL * symbol_factor))
                  + 0.3 * np.abs(u) + 0.3 * rng.standard_normal(num_bars))
    out = {"open": open_, "high": high, "low": low, "close": close, "volume": np.exp(log_volume)}
    if with_signal:
        out["signal_next"] = signal_next
    return out


EXTRA_PERSISTENCE = 0.9   # AR(1) coefficient of the extra, signal-free inputs x_1, x_2, ...


def symbol_name(index: int) -> str:
    return f"SYN{index:03d}"


def symbol_frame(seed: int, index: int, num_bars: int, bar_minutes: int = 60, start: str = "2020-01-01",
                 num_extra: int = 0, with_signal: bool = False) -> pd.DataFrame:
    """One symbol's bars: timestamp, symbol, OHLCV, then `num_extra` float32 columns x_1.. of AR(1) noise
    (drawn from a stream of their own: the bars are the same with or without them)."""
    from scipy.signal import lfilter

    timestamps = pd.date_range(start=start, periods=num_bars, freq=pd.Timedelta(minutes=bar_minutes))
    frame = pd.DataFrame({"timestamp": timestamps, "symbol": symbol_name(index),
                          **generate_symbol(seed, index, num_bars, with_signal=with_signal)})
    if num_extra:
        noise = np.random.default_rng([seed, index, 1]).standard_normal((num_bars, num_extra), dtype=np.float32)
        extra = lfilter([1.0], [1.0, -EXTRA_PERSISTENCE], noise, axis=0).astype(np.float32)
        frame = pd.concat([frame, pd.DataFrame(extra, columns=[f"x_{i + 1}" for i in range(num_extra)])], axis=1)
    return frame


def generate_bars(num_symbols: int, num_bars: int, seed: int = 0, bar_minutes: int = 60,
                  start: str = "2020-01-01", with_signal: bool = False, num_extra: int = 0) -> pd.DataFrame:
    """Long-format OHLCV bars: timestamp, symbol, open, high, low, close, volume (sorted by symbol, time)."""
    return pd.concat([symbol_frame(seed, index, num_bars, bar_minutes, start, num_extra, with_signal)
                      for index in range(num_symbols)], ignore_index=True)
