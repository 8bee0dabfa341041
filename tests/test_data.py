import numpy as np
import pandas as pd
import pytest
import torch

from enhanced_tft.config.schema import build_config
from enhanced_tft.data import features
from enhanced_tft.data.pipeline import SPLITS, build_data, split_bounds
from enhanced_tft.data.synthetic import ORACLE_DIRECTION_ACCURACY, generate_bars


@pytest.fixture
def bundle(small_raw):
    return build_data(build_config(small_raw))


def test_window_views_share_memory_with_the_base_array(bundle):
    split = bundle.splits["train"]
    observed, known = split.window(5)
    base = split.arrays
    assert observed.untyped_storage().data_ptr() == base.observed.untyped_storage().data_ptr()
    assert known.untyped_storage().data_ptr() == base.known.untyped_storage().data_ptr()
    assert observed.shape == (16, bundle.num_observed) and known.shape == (17, len(bundle.known_names))
    # a write through the base array is seen by the view: no copy was made
    end = int(split.sample_ends[5])
    base.observed[end, 0] += 1000.0
    assert observed[-1, 0] > 500.0
    base.observed[end, 0] -= 1000.0


def test_batch_gather_equals_the_window_views(bundle):
    split = bundle.splits["val"]
    idx = torch.tensor([0, 3, len(split) - 1])
    batch = split.batch(idx)
    for row, i in enumerate(idx.tolist()):
        observed, known = split.window(i)
        assert torch.equal(batch["observed"][row], observed)
        assert torch.equal(batch["known"][row], known)
        end = int(split.sample_ends[i])
        assert batch["target"][row] == split.arrays.target[end]


def test_no_window_or_target_crosses_a_split(small_raw):
    cfg = build_config(small_raw)
    data = build_data(cfg)
    symbol = data.splits["train"].arrays.symbol
    t, h = cfg.data.sequence_length, cfg.data.horizon
    for name in SPLITS:
        ends = data.splits[name].sample_ends.numpy()
        for sid in range(len(data.symbols)):
            rows = np.flatnonzero(symbol.numpy() == sid)
            offset, n = rows[0], len(rows)
            lo, hi = split_bounds(n, cfg.data)[name]
            mine = ends[(ends >= offset) & (ends < offset + n)] - offset
            assert len(mine) > 0
            assert (mine - t + 1 >= lo).all(), f"{name}: a window starts before its split"
            assert (mine + h < hi).all(), f"{name}: a target lies past its split"
    train_end = split_bounds(len(rows), cfg.data)["train"][1]
    val_lo = split_bounds(len(rows), cfg.data)["val"][0]
    assert val_lo - train_end == cfg.data.effective_purge_gap


def test_features_never_see_the_future():
    bars = generate_bars(1, 300, seed=3)
    lags, windows = [1, 2, 5], [10]
    before = features.observed_features(bars, lags, windows)
    changed = bars.copy()
    cut = 200
    for col in ("open", "high", "low", "close", "volume"):
        changed.loc[cut:, col] *= 1.7
    after = features.observed_features(changed, lags, windows)
    np.testing.assert_array_equal(before[:cut], after[:cut])
    assert not np.allclose(before[cut:], after[cut:])


def test_a_sample_does_not_see_its_own_target(bundle):
    """The target is the return from the window's last close to a later close: no input row holds that close."""
    split = bundle.splits["test"]
    ends = split.sample_ends
    lag1 = bundle.observed_names.index("ret_1")
    arrays = split.arrays
    # the next bar's 1-bar return (scaled) is the target itself for horizon 1: it must sit after the window
    next_ret = arrays.observed[ends + 1, lag1] * float(bundle.scaler["std"][lag1]) + float(bundle.scaler["mean"][lag1])
    np.testing.assert_allclose(next_ret.numpy(), arrays.raw_return[ends].numpy(), atol=1e-5)
    batch = split.batch(torch.arange(len(split)))
    # and the window's own last row is the bar before it: inputs stop at `end`
    torch.testing.assert_close(batch["observed"][:, -1], arrays.observed[ends])


def test_scaler_uses_the_train_part_only(small_raw):
    cfg = build_config(small_raw)
    bars = generate_bars(cfg.data.num_symbols, cfg.data.num_bars, seed=cfg.seed)
    reference = build_data(cfg, bars)
    shocked = bars.copy()
    late = shocked.groupby("symbol").cumcount() >= int(cfg.data.num_bars * 0.8)
    shocked.loc[late, "volume"] *= 50.0
    shocked.loc[late, ["open", "high", "low", "close"]] *= 3.0
    other = build_data(cfg, shocked)
    assert reference.scaler["mean"] == other.scaler["mean"]
    assert reference.scaler["std"] == other.scaler["std"]
    assert reference.transform.target_std == other.transform.target_std


def test_too_short_series_is_named_with_numbers(small_raw):
    small_raw["data"]["num_bars"] = 60
    with pytest.raises(ValueError, match=r"symbol 'SYN000' has 60 bars.*sequence_length=16"):
        build_data(build_config(small_raw))


def test_generator_is_deterministic_and_seed_dependent():
    a = generate_bars(2, 500, seed=1)
    b = generate_bars(2, 500, seed=1)
    c = generate_bars(2, 500, seed=2)
    pd.testing.assert_frame_equal(a, b)
    assert not np.allclose(a["close"], c["close"])
    assert (a["high"] >= a[["open", "close"]].max(axis=1)).all()
    assert (a["low"] <= a[["open", "close"]].min(axis=1)).all()


def test_planted_signal_reaches_the_documented_accuracy():
    bars = generate_bars(4, 50_000, seed=11, with_signal=True)
    ret = np.log(bars["close"]).groupby(bars["symbol"]).diff().shift(-1)
    valid = ret.notna() & (bars.groupby("symbol").cumcount() < 49_999)
    hit = (np.sign(bars["signal_next"]) == np.sign(ret))[valid].mean()
    assert ORACLE_DIRECTION_ACCURACY == pytest.approx(0.600, abs=0.002)
    # 200k draws: standard error ~0.0011, tolerance ~4 of them
    assert hit == pytest.approx(ORACLE_DIRECTION_ACCURACY, abs=0.005)
    up_rate = (ret[valid] > 0).mean()
    assert abs(up_rate - 0.5) < 0.01


def test_targets_per_task(small_raw):
    for task in ("regression", "classification_binary", "classification_multiclass"):
        small_raw["task"] = task
        data = build_data(build_config(small_raw))
        split = data.splits["train"]
        target = split.arrays.target[split.sample_ends]
        raw = split.arrays.raw_return[split.sample_ends]
        if task == "regression":
            torch.testing.assert_close(target, raw / data.transform.target_std)
        elif task == "classification_binary":
            assert torch.equal(target, (raw > 0).float())
        else:
            assert set(target.unique().tolist()) == {0.0, 1.0, 2.0}
            assert torch.equal(target == 1, raw.abs() <= data.dead_zone)
            share_flat = float((target == 1).float().mean())
            assert share_flat == pytest.approx(0.33, abs=0.01)   # the dead zone is the train quantile
