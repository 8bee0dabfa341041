"""The strong baseline: LightGBM on the model's features, splits and target, scored by the task like the model."""
import json
import logging
import sys

import numpy as np
import pytest
import torch

from enhanced_tft import tasks
from enhanced_tft.config.schema import load_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.data.synthetic import ORACLE_DIRECTION_ACCURACY
from enhanced_tft.data.windows import SeriesArrays, WindowSet
from enhanced_tft.errors import UserError
from enhanced_tft.evaluation.baselines import LightGBMSettings, baseline_features, fit_strong_baseline, most_recent
from enhanced_tft.evaluation.scorecard import score

pytest.importorskip("lightgbm")

# one thread: the test machine is shared, and OpenMP threads beyond the free cores spin against each other
SETTINGS = LightGBMSettings(num_threads=1)


def _config(task: str, num_symbols: int = 3, num_bars: int = 2000, *extra: str):
    return load_config(None, [f"task={task}", f"data.num_symbols={num_symbols}", f"data.num_bars={num_bars}",
                              "data.sequence_length=16", "seed=7", *extra])


def _split(data, name):
    split = data.splits[name]
    return split.arrays.target[split.sample_ends], split.arrays.raw_return[split.sample_ends]


@pytest.fixture(scope="module")
def binary():
    cfg = _config("classification_binary", 5, 4000)
    return cfg, build_data(cfg)


def test_binary_baseline_finds_the_planted_signal(binary):
    """5 symbols x 4000 bars (2895 test samples, accuracy s.e. about 0.009). Measured with data seeds 1..7:
    accuracy - majority rate 0.074 to 0.107, AUC 0.618 to 0.640; seed 7: 0.5962 vs 0.5071, AUC 0.6267."""
    cfg, data = binary
    task = tasks.for_config(cfg)
    result = fit_strong_baseline(cfg, task, data, settings=SETTINGS)
    test = result.metrics
    print(f"accuracy {test['accuracy']:.4f} majority {test['majority_rate']:.4f} auc {test['auc']:.4f} "
          f"best iteration {result.best_iteration} fit {result.fit_seconds:.1f} s")
    assert test["accuracy"] > test["majority_rate"] + 0.05
    assert test["auc"] > 0.58
    # and no better than the best possible predictor, beyond noise (3 s.e.): no future leaks into the features
    assert test["accuracy"] < ORACLE_DIRECTION_ACCURACY + 0.03
    # the signal is the sum of the last three returns: a return of the last bar leads the gain
    assert result.importances[0][0] in ("ret_2@t-0", "ret_3@t-0")
    assert result.num_features == 13 * 5 + 2 * 4 + 1 and result.num_train_rows == len(data.splits["train"])
    assert result.output_test.shape == (test["num_samples"], 1)       # logits, as the model's head
    assert torch.allclose(result.prediction_test, torch.sigmoid(result.output_test[:, 0]))

    # evaluation.score takes its predictions as it takes a member's, with the same numbers
    target, raw = _split(data, "test")
    assert score(task, [result.prediction_test], target, raw, data.target_scale(), 0.5)["test"] == test
    summary = json.loads(json.dumps(result.to_summary()))
    assert summary["test"] == test and summary["best_iteration"] == result.best_iteration
    assert len(summary["importances"]) == 10 and summary["settings"]["objectives"] == ["binary"]
    shares = [share for _, share in result.importances]                 # the top 20 of 74: 0.64 of the gain
    assert shares == sorted(shares, reverse=True) and 0.3 < sum(shares) <= 1.0 + 1e-9


def test_the_row_cap_keeps_the_most_recent_samples(binary, caplog):
    cfg, data = binary
    train = data.splits["train"]
    kept = most_recent(train, 1000)
    stamps = train.arrays.timestamp.numpy()
    kept_stamps = stamps[kept.sample_ends.numpy()]
    dropped = np.setdiff1d(train.sample_ends.numpy(), kept.sample_ends.numpy())
    assert len(kept) == 1000 and len(dropped) == len(train) - 1000
    assert kept_stamps.min() >= stamps[dropped].max()                     # every symbol's latest, not one symbol's
    assert len(np.unique(train.arrays.symbol.numpy()[kept.sample_ends.numpy()])) == 5
    assert (np.diff(kept.sample_ends.numpy()) > 0).all()                  # the split's order kept

    caplog.set_level(logging.INFO, logger="enhanced_tft.evaluation.baselines")
    result = fit_strong_baseline(cfg, tasks.for_config(cfg), data,
                                 settings=LightGBMSettings(num_threads=1, max_train_rows=1000, max_trees=20))
    assert result.num_train_rows == 1000 and result.num_train_rows_available == len(train)
    assert f"the 1000 most recent of {len(train)} train samples" in caplog.text


def test_feature_columns_are_the_bars_they_name():
    rows, num_observed, num_known, horizon = 40, 3, 2, 2
    arrays = SeriesArrays(
        observed=torch.arange(rows * num_observed, dtype=torch.float32).view(rows, num_observed),   # row*3 + j
        known=-torch.arange(rows * num_known, dtype=torch.float32).view(rows, num_known),          # -(row*2 + k)
        target=torch.zeros(rows), raw_return=torch.zeros(rows),
        symbol=torch.cat([torch.zeros(20), torch.ones(20)]).long())
    ends = np.array([9, 15, 27, 35])
    windows = WindowSet(arrays, ends, sequence_length=8, horizon=horizon)
    features, names = baseline_features(windows, 3, ["ret_1", "vol_10", "range"], ["hour_sin", "hour_cos"])
    assert names[:4] == ["ret_1@t-0", "ret_1@t-1", "ret_1@t-2", "vol_10@t-0"]
    assert names[9:] == ["hour_sin@t-0", "hour_cos@t-0", "hour_sin@t+2", "hour_cos@t+2", "symbol"]
    assert features.shape == (4, 3 * 3 + 2 * 2 + 1) and features.dtype == np.float32
    column = {name: features[:, j] for j, name in enumerate(names)}
    observed, known = arrays.observed.numpy(), arrays.known.numpy()
    assert np.array_equal(column["ret_1@t-1"], observed[ends - 1, 0])      # e.g. sample 0: row 8, 24.0
    assert np.array_equal(column["range@t-2"], observed[ends - 2, 2])
    assert np.array_equal(column["vol_10@t-0"], observed[ends, 1])
    assert np.array_equal(column["hour_cos@t-0"], known[ends, 1])
    assert np.array_equal(column["hour_sin@t+2"], known[ends + horizon, 0])   # the calendar ahead, known in advance
    assert column["ret_1@t-1"].tolist() == [24.0, 42.0, 78.0, 102.0]
    assert column["symbol"].tolist() == [0, 0, 1, 1]
    with pytest.raises(ValueError, match=r"lags=9 must lie in \[1, sequence_length=8\]"):
        baseline_features(windows, 9)


def test_regression_predicts_scaled_values_that_the_task_scores():
    cfg = _config("regression")
    data = build_data(cfg)
    task = tasks.for_config(cfg)
    result = fit_strong_baseline(cfg, task, data, settings=SETTINGS)
    num_test = len(data.splits["test"])
    assert result.output_test.shape == (num_test, 1) and result.prediction_test.shape == (num_test,)
    assert set(result.metrics) == {"mae", "rmse", "direction_accuracy", "num_samples"}
    # scaled units: x train std gives log returns of the test split's size (not, say, returns x 1/std)
    _, raw = _split(data, "test")
    values = result.prediction_test * data.target_scale().std
    assert 0.01 < float(values.std() / raw.std()) < 1.0 and result.metrics["mae"] < 2 * float(raw.abs().mean())
    assert result.settings["objectives"] == ["huber"]
    again = fit_strong_baseline(cfg, task, data, settings=SETTINGS)
    assert torch.equal(again.output_test, result.output_test)            # seeded and deterministic


def test_quantiles_come_from_three_boosters_and_do_not_cross():
    cfg = _config("quantile")
    data = build_data(cfg)
    result = fit_strong_baseline(cfg, tasks.for_config(cfg), data, settings=SETTINGS)
    assert result.output_test.shape == (len(data.splits["test"]), 3) and len(result.best_iterations) == 3
    assert (result.prediction_test[:, 1:] >= result.prediction_test[:, :-1]).all()
    assert 0.6 < result.metrics["coverage_p10_p90"] < 0.95            # measured 0.754 for a nominal 0.8
    assert result.settings["objectives"] == ["quantile"] * 3


def test_multiclass_gives_three_logits():
    cfg = _config("classification_multiclass")
    data = build_data(cfg)
    result = fit_strong_baseline(cfg, tasks.for_config(cfg), data, settings=SETTINGS)
    assert result.output_val.shape == (len(data.splits["val"]), 3)
    assert result.output_test.shape == (len(data.splits["test"]), 3)
    probabilities = torch.softmax(result.output_test, dim=1)
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(probabilities)), atol=1e-6)
    assert torch.allclose(result.prediction_test, probabilities)
    assert set(result.metrics) == {"accuracy", "balanced_accuracy", "auc", "num_samples"}
    assert result.metrics["auc"] > 0.55                                  # measured 0.62


def test_without_lightgbm_the_error_says_how_to_install_or_turn_off(monkeypatch):
    cfg = _config("classification_binary", 1, 200)
    data = build_data(cfg)
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(UserError, match=r"pip install 'enhanced-tft\[baseline\]'.*train\.strong_baseline=false"):
        fit_strong_baseline(cfg, tasks.for_config(cfg), data)


class _Ranking(tasks.Task):
    """A task registered elsewhere whose outputs no LightGBM objective here gives."""
    name = "ranking_test"
    columns = ("score",)
    probabilities = False


def test_a_task_without_a_mapping_is_skipped_with_a_log_line(caplog):
    cfg = _config("classification_binary", 1, 200)
    data = build_data(cfg)
    caplog.set_level(logging.WARNING, logger="enhanced_tft.evaluation.baselines")
    assert fit_strong_baseline(cfg, _Ranking(), data, settings=SETTINGS) is None
    assert "strong baseline skipped" in caplog.text and "_Ranking" in caplog.text


def test_a_training_run_reports_lightgbm_and_the_quant_metrics_beside_the_model(trained_run):
    """summary.json of a real `etft train`: LightGBM scored on the same test samples, and the quant metrics equal
    those computed again from predictions_test.csv (the same predictions, written as users read them)."""
    import json

    import pandas as pd

    from enhanced_tft.evaluation.quant import quant_metrics
    summary = json.loads((trained_run / "summary.json").read_text())
    strong = summary["strong_baseline"]
    assert strong["model"] == "LightGBM" and strong["test"]["num_samples"] == summary["test"]["num_samples"]
    assert strong["test"]["majority_rate"] == summary["test"]["majority_rate"]   # the same samples
    assert 0.0 <= strong["test"]["auc"] <= 1.0 and strong["best_iteration"] >= 1
    frame = pd.read_csv(trained_run / "predictions_test.csv", parse_dates=["timestamp"])
    again = quant_metrics(frame, "classification_binary", cost_bps=5.0, horizon=1, quantile=0.2)
    saved = summary["quant"]["model"]
    assert saved["num_rows"] == len(frame) == summary["test"]["num_samples"]
    for key in ("mean", "std", "share_positive"):
        assert saved["information_coefficient"]["cross_sectional"]["rank"][key] == pytest.approx(
            again["information_coefficient"]["cross_sectional"]["rank"][key], abs=1e-6)
    assert saved["backtest"]["sign"]["total_return"] == pytest.approx(again["backtest"]["sign"]["total_return"],
                                                                      rel=1e-5)
    assert summary["quant"]["strong_baseline"]["num_rows"] == len(frame)
    log = (trained_run / "training.log").read_text()
    assert "LightGBM       blend    baseline" in log and "quant: signal 2 p_up - 1" in log


def test_the_equity_curves_and_the_report_section_agree_with_the_summary(trained_run):
    import json

    import pandas as pd
    summary = json.loads((trained_run / "summary.json").read_text())
    curves = pd.read_csv(trained_run / "backtest_test.csv")
    assert list(curves.columns) == ["timestamp", "model", "LightGBM", "blend", "equal-weight long"]
    for column, quant in (("model", summary["quant"]["model"]), ("LightGBM", summary["quant"]["strong_baseline"])):
        assert curves[column].iloc[-1] - 1 == pytest.approx(quant["backtest"]["sign"]["total_return"], abs=1e-5)
    benchmark = summary["quant"]["model"]["benchmark"]["total_return"]
    assert curves["equal-weight long"].iloc[-1] - 1 == pytest.approx(benchmark, abs=1e-5)
    page = (trained_run / "report.html").read_text()
    section = page[page.index("<h2>Signal and backtest (test split)</h2>"):page.index("<h2>Data</h2>")]
    assert "model: rank IC" in section and "LightGBM: sign" in section and 'alt="equity curves"' in section
    assert "<th>LightGBM</th>" in page[:page.index("<h2>Signal and backtest")]   # beside the model's metrics


def test_evaluate_applies_the_saved_boosters_and_reproduces_the_summary(trained_run, capsys):
    """strong_baseline.json holds LightGBM's text models: `etft evaluate` on the run's own test split scores
    LightGBM as summary.json did, and its quant metrics match."""
    import json

    from enhanced_tft.cli import main
    summary = json.loads((trained_run / "summary.json").read_text())
    saved = json.loads((trained_run / "strong_baseline.json").read_text())
    assert saved["lags"] == 5 and saved["boosters"][0].startswith("tree")
    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key, value in summary["strong_baseline"]["test"].items():
        assert result["strong_baseline"][key] == pytest.approx(value, abs=1e-6), key
    assert result["quant"]["model"]["backtest"]["sign"]["total_return"] == pytest.approx(
        summary["quant"]["model"]["backtest"]["sign"]["total_return"], abs=1e-9)
