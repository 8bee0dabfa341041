"""Indicators, targets, date splits, dead zones, extra columns, gaps, memory-mapped arrays, prediction windows."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from enhanced_tft.config.schema import build_config
from enhanced_tft.data import features
from enhanced_tft.data.bar_checks import count_gaps
from enhanced_tft.data.pipeline import build_data, build_prediction_data, split_bounds
from enhanced_tft.data.synthetic import generate_bars
from enhanced_tft.data.transform import RunningMoments, Transform
from enhanced_tft.errors import ConfigError


def _bars(close, high=None, low=None):
    close = np.asarray(close, float)
    return pd.DataFrame({"close": close, "high": close if high is None else high,
                         "low": close if low is None else low, "open": close, "volume": np.ones_like(close)})


def test_rsi_and_atr_match_wilders_definitions():
    rising = features.observed_features(_bars(np.arange(1.0, 41.0)), [1], [2])
    names = features.observed_feature_names([1], [2])
    rsi, atr = rising[:, names.index("rsi_14")], rising[:, names.index("atr_14")]
    assert np.isnan(rsi[:14]).all() and np.allclose(rsi[14:], 0.5)     # only gains: RSI 100
    # constant range of 2 around a flat close: true range 2 every bar, so the ATR is 2, divided by the close 10
    flat = features.observed_features(_bars(np.full(40, 10.0), np.full(40, 11.0), np.full(40, 9.0)), [1], [2])
    np.testing.assert_allclose(flat[15:, names.index("atr_14")], 0.2, rtol=1e-6)
    np.testing.assert_allclose(flat[15:, names.index("rsi_14")], 0.0)   # no change: RSI 50
    # alternating +1/-1 moves: Wilder's averages of gains and losses converge to each other (RSI -> 50)
    zigzag = features.observed_features(_bars(10 + np.tile([0.0, 1.0], 200)), [1], [2])
    assert abs(zigzag[-1, names.index("rsi_14")]) < 0.04
    assert features.warmup_bars([1], [2]) == 20                        # volume z-score is the longest here


def test_forward_realized_volatility_is_the_rms_of_the_next_returns():
    returns = np.array([0.1, -0.2, 0.3, 0.1, 0.0])
    close = np.exp(np.concatenate([[0.0], np.cumsum(returns)]))
    out = features.forward_realized_volatility(close, 2)
    expected = [np.sqrt((returns[i] ** 2 + returns[i + 1] ** 2) / 2) for i in range(4)]
    np.testing.assert_allclose(out[:4], expected, rtol=1e-6)
    assert np.isnan(out[4:]).all()


def test_volatility_target_is_centred_and_scaled_on_train(small_raw):
    small_raw.update(task="regression")
    small_raw["data"].update(target="volatility", horizon=3)
    small_raw["train"]["volatility_loss"] = "huber"   # the volatility itself (qlike and log_mse: its log)
    data = build_data(build_config(small_raw))
    train = data.splits["train"]
    raw = train.arrays.raw_return[train.sample_ends].double()
    assert raw.min() > 0                                               # a volatility, not a return
    assert data.transform.target_mean == pytest.approx(float(raw.mean()), rel=1e-6)
    assert data.transform.target_std == pytest.approx(float(raw.std(unbiased=False)), rel=1e-5)
    scaled = train.arrays.target[train.sample_ends]
    assert float(scaled.mean()) == pytest.approx(0.0, abs=1e-5) and float(scaled.std()) == pytest.approx(1.0, abs=1e-3)
    with pytest.raises(ConfigError, match="data.target='volatility' needs task regression or quantile"):
        build_config({"task": "classification_binary", "data": {"target": "volatility"}})


def test_binary_dead_zone_leaves_out_small_moves_in_every_split(small_raw, caplog):
    small_raw["data"]["binary_dead_zone"] = 0.25
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        data = build_data(build_config(small_raw))
    threshold = data.transform.binary_dead_zone
    full = build_data(build_config({**small_raw, "data": {**small_raw["data"], "binary_dead_zone": 0.0}}))
    for name, split in data.splits.items():
        forward = full.splits[name].arrays.raw_return
        assert (forward[split.sample_ends].abs() > threshold).all()
        left_out = len(full.splits[name]) - len(split)
        assert left_out == int((forward[full.splits[name].sample_ends].abs() <= threshold).sum())
    assert len(data.splits["train"]) / len(full.splits["train"]) == pytest.approx(0.75, abs=0.01)
    assert "binary dead zone: left out the samples with |return| <=" in caplog.text


def test_date_splits_cut_at_the_dates_with_the_purge_gap(small_raw):
    small_raw["data"].update(val_start="2020-01-20", test_start="2020-01-25 12:00", purge_gap=4)
    data = build_data(build_config(small_raw))
    stamp = lambda split: pd.to_datetime(split.arrays.timestamp[split.sample_ends].numpy())
    train, val, test = (data.splits[s] for s in ("train", "val", "test"))
    assert stamp(train).max() < pd.Timestamp("2020-01-20") and stamp(val).max() < pd.Timestamp("2020-01-25 12:00")
    # the first val window starts 4 bars (the purge gap) after the cut, then needs sequence_length bars
    assert stamp(val).min() == pd.Timestamp("2020-01-20") + pd.Timedelta(hours=4 + 16 - 1)
    assert stamp(test).min() == pd.Timestamp("2020-01-25 12:00") + pd.Timedelta(hours=4 + 16 - 1)
    with pytest.raises(ConfigError, match="set both dates"):
        build_config({"data": {"val_start": "2020-01-20"}})
    with pytest.raises(ConfigError, match="is not before test_start"):
        build_config({"data": {"val_start": "2021-01-01", "test_start": "2020-01-01"}})
    with pytest.raises(ConfigError, match="val_start='soon' is not a date"):
        build_config({"data": {"val_start": "soon", "test_start": "2020-01-01"}})


def test_extra_columns_pass_through_scaled_on_train(small_raw, tmp_path):
    bars = generate_bars(2, 700, seed=7)
    bars["funding"] = np.linspace(-1.0, 5.0, len(bars))
    bars["note"] = "x"
    path = tmp_path / "bars.csv"
    bars.to_csv(path, index=False)
    small_raw["data"].update(source="file", path=str(path), extra_columns=["funding"])
    data = build_data(build_config(small_raw))
    assert data.observed_names[-1] == "funding" and data.transform.extra_columns == ["funding"]
    column = data.splits["train"].arrays.observed[:, -1]
    raw = column.double() * data.transform.std[-1] + data.transform.mean[-1]
    warmup = features.warmup_bars(small_raw["data"].get("return_lags", [1, 2, 3, 5, 10, 20]), [10, 30])
    np.testing.assert_allclose(raw[:10].numpy(), bars["funding"].to_numpy()[warmup:warmup + 10], rtol=1e-5)
    small_raw["data"]["extra_columns"] = "all"       # the text column is left out, the numeric one kept
    assert build_data(build_config(small_raw)).transform.extra_columns == ["funding"]
    small_raw["data"]["extra_columns"] = ["fundng"]
    with pytest.raises(ValueError, match=r"lacks the extra column\(s\) fundng .*the file has: timestamp, symbol"):
        build_data(build_config(small_raw))


def test_prediction_windows_equal_the_test_windows_and_refuse_other_columns(small_raw):
    small_raw["data"]["num_extra_features"] = 2
    cfg = build_config(small_raw)
    data = build_data(cfg)
    predict = build_prediction_data(cfg, Transform.from_dict(data.scaler))
    test = data.splits["test"]
    key = {(int(s), int(t)): i for i, (s, t) in enumerate(zip(
        predict.windows.arrays.symbol[predict.windows.sample_ends], predict.windows.arrays.timestamp[predict.windows.sample_ends]))}
    index = torch.tensor([key[(int(s), int(t))] for s, t in zip(
        test.arrays.symbol[test.sample_ends], test.arrays.timestamp[test.sample_ends])])
    ours, theirs = test.batch(torch.arange(len(test))), predict.windows.batch(index)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    # the last bar of each symbol gets a prediction, with calendar inputs for the bar after it, but no target
    assert (~predict.target_known).sum() == 2 * cfg.data.horizon
    assert predict.timestamps()[-1] == np.datetime64(generate_bars(1, 700)["timestamp"].iloc[-1])
    bars = generate_bars(2, 700, seed=7, num_extra=3)
    with pytest.raises(ValueError, match=r"trained on \[x_1, x_2\], the data has \[x_1, x_2, x_3\].*not in training: x_3"):
        build_prediction_data(cfg, data.transform, bars)
    other = generate_bars(3, 700, seed=7, num_extra=2)
    with pytest.raises(ValueError, match=r"symbol\(s\) SYN002 were not in the run's training data"):
        build_prediction_data(cfg, data.transform, other)
    with pytest.raises(ValueError, match="not a saved transform of this version"):
        Transform.from_dict({"features": ["ret_1"], "mean": [0.0], "std": [1.0]})


def test_memory_mapped_features_equal_the_in_memory_ones_and_leave_no_file(small_raw, tmp_path):
    reference = build_data(build_config(small_raw))
    small_raw["data"]["memory_map_dir"] = str(tmp_path / "mmap")
    mapped = build_data(build_config(small_raw))
    # the tensor's memory is a mapping of the (already unlinked) feature file: see /proc/self/maps
    address = mapped.splits["train"].arrays.observed.data_ptr()
    spans = [line.split()[0].split("-") for line in open("/proc/self/maps") if "etft_features_" in line]
    assert any(int(lo, 16) <= address < int(hi, 16) for lo, hi in spans)
    assert all("(deleted)" in line for line in open("/proc/self/maps") if "etft_features_" in line)
    assert torch.equal(reference.splits["train"].arrays.observed, mapped.splits["train"].arrays.observed)
    assert list((tmp_path / "mmap").iterdir()) == []


def test_running_moments_equal_numpy():
    rows = np.random.default_rng(0).normal(3.0, 2.0, size=(10_001, 3)).astype(np.float32)
    moments = RunningMoments(3)
    moments.add(rows[:17], chunk_rows=5)
    moments.add(rows[17:], chunk_rows=4096)
    np.testing.assert_allclose(moments.mean, rows.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(moments.std(), rows.astype(np.float64).std(axis=0), rtol=1e-10)


def test_gaps_are_reported_and_filled_up_to_the_limit(caplog):
    stamps = pd.to_datetime(["2020-01-01 00:00", "2020-01-01 01:00", "2020-01-01 04:00", "2020-01-01 05:00",
                             "2020-01-01 10:00", "2020-01-01 11:00"])
    frame = pd.DataFrame({"timestamp": stamps, "symbol": "A", "open": 1.0, "high": 2.0, "low": 0.5,
                          "close": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "volume": 10.0})
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        filled = count_gaps(frame, 2)
    assert "2 gaps (steps longer than the symbol's usual step, 6 missing bars in all)" in caplog.text
    assert len(filled) == 8                                    # the 2-bar gap is filled, the 4-bar gap is not
    new = filled.iloc[2:4]
    assert list(new["timestamp"]) == list(pd.to_datetime(["2020-01-01 02:00", "2020-01-01 03:00"]))
    assert (new[["open", "high", "low", "close"]] == 2.0).all().all() and (new["volume"] == 0).all()
    assert count_gaps(frame, 0).equals(frame)


def test_walk_forward_folds_test_on_consecutive_blocks_with_everything_before_for_training():
    bounds = [split_bounds(1000, build_config({"data": {"walk_forward_folds": 3, "fold": k, "purge_gap": 2}}).data)
              for k in range(3)]
    assert [b["test"] for b in bounds] == [(552, 700), (702, 850), (852, 1000)]      # consecutive test blocks
    assert [b["train"] for b in bounds] == [(0, 400), (0, 550), (0, 700)]            # an expanding window
    assert [b["val"] for b in bounds] == [(402, 550), (552, 700), (702, 850)]
    plain = split_bounds(1000, build_config({"data": {"purge_gap": 2}}).data)
    assert bounds[-1] == plain                                                       # the last fold is the plain split
    with pytest.raises(ConfigError, match=r"val_fraction \+ test_fraction x walk_forward_folds=5 = 0.9 leaves under"):
        build_config({"data": {"walk_forward_folds": 5}})
    with pytest.raises(ConfigError, match="fold=3 needs walk_forward_folds > 3"):
        build_config({"data": {"walk_forward_folds": 3, "fold": 3}})
