"""etft predict / etft evaluate on a saved run: exact reproduction of its test metrics, streaming over new bars,
and refusal of data and checkpoints that do not belong to the run."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import run_cli
from enhanced_tft.cli import main
from enhanced_tft.data.synthetic import generate_bars
from enhanced_tft.data.transform import Transform
from enhanced_tft.serving.predict import TableWriter
from enhanced_tft.tasks import BinaryClassification, TargetScale

NUM_NEW_BARS = 120
WARMUP = 31          # features.warmup_bars of the default lags and windows
SEQUENCE_LENGTH = 16


def _etft(*args: str, cwd: Path):
    return run_cli(["-m", "enhanced_tft.cli", *args], cwd=cwd)


def test_evaluate_and_predict_reproduce_the_summary_exactly(trained_run: Path, tmp_path: Path):
    summary = json.loads((trained_run / "summary.json").read_text())
    result = _etft("evaluate", "--run", str(trained_run), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    scored = json.loads(result.stdout)
    assert scored["test"] == summary["test"]                                     # to the bit, not approximately
    assert [m["test"] for m in scored["ensemble"]["members"]] == [m["test"] for m in summary["ensemble"]["members"]]
    assert {k: v for k, v in summary["baseline"].items() if k != "output"} == scored["baseline"]

    result = _etft("predict", "--run", str(trained_run), "--out", str(tmp_path / "test.parquet"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = pd.read_parquet(tmp_path / "test.parquet")
    assert list(frame.columns) == ["symbol", "timestamp", "actual", "label", "p_up", "class", "p_up_spread",
                                   "member_0_p_up", "member_1_p_up"]
    assert frame.p_up.dtype == np.float32 and len(frame) == summary["test"]["num_samples"]
    assert frame.groupby("symbol").timestamp.apply(lambda t: t.is_monotonic_increasing).all()
    metrics = BinaryClassification().metrics(torch.tensor(frame.p_up.to_numpy()), torch.tensor(frame.label.to_numpy()),
                                             torch.tensor(frame.actual.to_numpy()), TargetScale())
    assert metrics == summary["test"]
    # a second predict to the same file is refused, the file kept; --overwrite replaces it
    before = (tmp_path / "test.parquet").stat().st_mtime_ns
    again = _etft("predict", "--run", str(trained_run), "--out", str(tmp_path / "test.parquet"), cwd=tmp_path)
    assert again.returncode == 2 and "already exists; give another --out, or add --overwrite" in again.stderr
    assert (tmp_path / "test.parquet").stat().st_mtime_ns == before
    forced = _etft("predict", "--run", str(trained_run), "--out", str(tmp_path / "test.parquet"), "--overwrite",
                   cwd=tmp_path)
    assert forced.returncode == 0 and pd.read_parquet(tmp_path / "test.parquet").equals(frame)


def test_predict_streams_every_window_of_a_new_file(trained_run: Path, tmp_path: Path):
    generate_bars(2, NUM_NEW_BARS, seed=11).to_csv(tmp_path / "new.csv", index=False)
    # batches of 16: the CSV is appended to many times, with one header
    result = _etft("predict", "--run", str(trained_run), "--data", "new.csv", "--out", "new.csv.gz",
                   "--batch-size", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(tmp_path / "new.csv.gz", parse_dates=["timestamp"])
    per_symbol = NUM_NEW_BARS - WARMUP - SEQUENCE_LENGTH + 1                   # a window ending at every bar
    assert frame.symbol.value_counts().to_dict() == {"SYN000": per_symbol, "SYN001": per_symbol}
    last = frame.groupby("symbol").tail(1)
    assert last.actual.isna().all() and last.label.isna().all()                 # the newest bar's outcome is unknown
    assert frame.actual.notna().sum() == 2 * (per_symbol - 1)
    assert last.timestamp.tolist() == [pd.Timestamp("2020-01-01") + pd.Timedelta(hours=NUM_NEW_BARS - 1)] * 2
    assert frame.p_up.between(0, 1).all()
    assert frame.p_up_spread.to_numpy() == pytest.approx((frame.member_0_p_up - frame.member_1_p_up).abs() / 2,
                                                         abs=1e-7)


def test_a_file_with_a_missing_column_is_refused(trained_run: Path, tmp_path: Path):
    generate_bars(2, NUM_NEW_BARS, seed=11).drop(columns=["volume"]).to_csv(tmp_path / "bars.csv", index=False)
    result = _etft("predict", "--run", str(trained_run), "--data", "bars.csv", "--out", "p.csv", cwd=tmp_path)
    assert result.returncode == 2
    assert "lacks column(s) volume" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "p.csv").exists()


def test_other_features_than_training_are_refused_with_the_difference(trained_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    scaler = json.loads((run / "scaler.json").read_text())
    scaler.update(features=scaler["features"] + ["x_1"], extra_columns=["x_1"], mean=scaler["mean"] + [0.0],
                  std=scaler["std"] + [1.0])
    (run / "scaler.json").write_text(json.dumps(scaler))
    summary = json.loads((run / "summary.json").read_text())   # as if trained so: the edit is not refused as one
    summary["data"]["transform_sha256"] = Transform.from_dict(scaler).sha256()
    (run / "summary.json").write_text(json.dumps(summary))
    generate_bars(2, NUM_NEW_BARS, seed=11).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--run", str(run), "--data", str(tmp_path / "new.csv")]) == 2
    err = capsys.readouterr().err
    assert "the data's extra columns differ from the run's" in err and "missing: x_1" in err

    assert main(["evaluate", "--run", str(trained_run), "--set", "data.sequence_length=8"]) == 2
    assert "only the keys that say how to read --data may change" in capsys.readouterr().err


class _RunsCodeWhenUnpickled:
    """What an attacker would put in a checkpoint: unpickling calls open(marker, 'w')."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_would_run_code_is_refused(trained_run: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    marker = tmp_path / "code_ran"
    torch.save({"head.linear.weight": _RunsCodeWhenUnpickled(str(marker))}, run / "checkpoints" / "member_1_best.pt")
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert "member_1_best.pt" in err and "refused" in err and "nothing in it was run" in err
    assert not marker.exists() and not (tmp_path / "p.parquet").exists()
    torch.load(run / "checkpoints" / "member_1_best.pt", weights_only=False)   # the file is truly malicious:
    assert marker.exists()                                                   # a plain load runs its code


def test_output_endings(tmp_path: Path):
    with pytest.raises(ValueError, match="allowed endings .parquet, .csv, .csv.gz"):
        TableWriter(tmp_path / "p.xlsx")


TASK_COLUMNS = {
    ("regression", "return"): ["symbol", "timestamp", "actual", "value", "value_spread"],
    ("regression", "volatility"): ["symbol", "timestamp", "actual", "value", "value_spread"],
    ("quantile", "return"): ["symbol", "timestamp", "actual", "p10", "p50", "p90", "p10_spread", "p50_spread",
                             "p90_spread"],
    ("classification_multiclass", "return"): ["symbol", "timestamp", "actual", "label", "p_down", "p_flat", "p_up",
                                              "class", "p_down_spread", "p_flat_spread", "p_up_spread"],
}


@pytest.mark.slow
@pytest.mark.parametrize("task, target", sorted(TASK_COLUMNS))
def test_predict_and_evaluate_every_task_and_the_volatility_target(task, target, tmp_path, capsys):
    """Every task (the binary one above) and the volatility target: evaluate reproduces summary.json to the bit,
    predict writes the task's columns, and the written values score as the summary says."""
    assert main(["train", "--test_mode", "--task", task, "--log_dir", str(tmp_path / "logs"), "--set",
                 f"data.target={target}", "--set", "train.max_steps_per_epoch=4", "--set", "data.num_bars=400",
                 "--set", "train.epochs=1", "--set", "run.report=false"]) == 0
    (run,) = (tmp_path / "logs").glob("training_*")
    assert not (run / "report.html").exists()                              # run.report=false
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["task"] == task and scored["test"] == summary["test"]
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "p.parquet")]) == 0
    frame = pd.read_parquet(tmp_path / "p.parquet")
    assert list(frame.columns) == TASK_COLUMNS[(task, target)]
    assert len(frame) == summary["test"]["num_samples"] and frame.actual.notna().all()
    if target == "volatility":
        # the outcome column is what the model predicts, the realized volatility: scored as the summary says
        assert (frame.actual > 0).all() and (frame.value > 0).mean() > 0.95
        assert (frame.value - frame.actual).abs().mean() == pytest.approx(summary["test"]["mae"], rel=1e-5)
    if task == "quantile":
        assert (frame.p10 <= frame.p50).all() and (frame.p50 <= frame.p90).all()
        inside = ((frame.actual >= frame.p10) & (frame.actual <= frame.p90)).mean()
        assert inside == pytest.approx(summary["test"]["coverage_p10_p90"], abs=1e-6)
    if task == "classification_multiclass":
        probabilities = frame[["p_down", "p_flat", "p_up"]].to_numpy()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        assert (frame["class"].to_numpy() == probabilities.argmax(axis=1)).all()
        assert (frame["class"] == frame["label"]).mean() == pytest.approx(summary["test"]["accuracy"], abs=1e-6)
