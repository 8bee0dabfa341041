"""Look-ahead leakage harness: on bars whose future is pure noise, no model can beat the majority rate unless
the future leaks into its inputs. The harness must pass the real pipeline and catch planted leaks."""
import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import training_model
from enhanced_tft import tasks
from enhanced_tft.config.schema import build_config
from enhanced_tft.data import features
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.runtime.precision import resolve_precision
from enhanced_tft.training.trainer import Trainer

CPU = torch.device("cpu")
RAW = {"seed": 3, "data": {"sequence_length": 16, "return_lags": [1, 2, 5], "volatility_windows": [10]},
       "model": {"d_model": 16, "num_heads": 2, "num_transformer_blocks": 1, "ff_dim": 32, "variable_hidden_size": 4,
                 "dropout_rate": 0.0},
       "train": {"micro_batch_size": 64, "epochs": 3, "learning_rate": 3e-3, "early_stopping_patience": 3}}


def random_walk_bars(num_symbols: int = 3, num_bars: int = 1500, seed: int = 11) -> pd.DataFrame:
    """Bars of i.i.d. returns: the direction of the next bar is a coin flip that only the future knows."""
    rng = np.random.default_rng(seed)
    frames = []
    for index in range(num_symbols):
        close = 100 * np.exp(np.cumsum(0.01 * rng.standard_normal(num_bars)))
        open_ = np.concatenate([[100.0], close[:-1]])
        frames.append(pd.DataFrame({
            "timestamp": pd.date_range("2021-01-01", periods=num_bars, freq="h"), "symbol": f"RW{index}",
            "open": open_, "high": np.maximum(open_, close) * 1.002, "low": np.minimum(open_, close) * 0.998,
            "close": close, "volume": rng.uniform(1e3, 2e3, num_bars)}))
    return pd.concat(frames, ignore_index=True)


def direction_skill(bars: pd.DataFrame) -> tuple[float, float, float]:
    """Train a small classifier; return test accuracy, the test majority rate, and z = their gap in binomial sds."""
    cfg = build_config(RAW)
    data = build_data(cfg, bars)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(training_model(cfg, data), data, cfg, CPU, resolve_precision("fp32", CPU), seed=cfg.seed)
    trainer.fit()
    test = trainer.evaluate("test")
    metrics = tasks.for_config(cfg).metrics(test.prediction, test.target, test.raw_return, data.target_scale())
    majority, n = metrics["majority_rate"], metrics["num_samples"]
    return metrics["accuracy"], majority, (metrics["accuracy"] - majority) / math.sqrt(majority * (1 - majority) / n)


def test_noise_only_the_future_knows_stays_at_the_majority_rate():
    accuracy, majority, z = direction_skill(random_walk_bars())
    assert abs(z) < 3.0, f"accuracy {accuracy:.4f} vs majority {majority:.4f} (z {z:.2f}): a look-ahead leak?"


def test_the_harness_catches_a_feature_equal_to_the_future_target():
    bars = random_walk_bars()
    bars["leak"] = bars.groupby("symbol")["close"].transform(lambda c: np.log(c.shift(-1) / c)).fillna(0.0)
    accuracy, majority, z = direction_skill(bars)
    assert z > 10.0 and accuracy > 0.8, f"planted leak not caught: accuracy {accuracy:.4f}, z {z:.2f}"


def test_the_harness_catches_a_target_aligned_one_bar_too_early(monkeypatch):
    """An off-by-one in the target (the return of the window's own last bar) is the classic pipeline leak."""
    def leaky(close, horizon):
        log_close = np.log(close.astype(np.float64))
        out = np.full_like(log_close, np.nan)
        out[horizon:] = log_close[horizon:] - log_close[:-horizon]     # the past return, not the next one
        return out.astype(np.float32)
    monkeypatch.setattr(features, "forward_log_return", leaky)
    accuracy, majority, z = direction_skill(random_walk_bars())
    assert z > 10.0 and accuracy > 0.8, f"planted leak not caught: accuracy {accuracy:.4f}, z {z:.2f}"
