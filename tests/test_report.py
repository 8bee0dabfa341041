"""What training leaves for people to read: report.html, the interpretation CSVs, the test predictions."""
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import run_cli
from enhanced_tft.tasks import BinaryClassification, TargetScale

FIGURES = ("test metrics", "learning curves", "memory over time", "calibration", "variable importance",
           "variable importance by symbol", "attention by lag", "ensemble spread", "equity curves")


def test_training_writes_a_report_with_the_key_numbers(trained_run: Path):
    summary = json.loads((trained_run / "summary.json").read_text())
    page = (trained_run / "report.html").read_text()
    assert [f'alt="{name}"' in page for name in FIGURES] == [True] * len(FIGURES)
    assert page.count("data:image/png;base64,") == len(FIGURES) and "src=\"http" not in page   # self-contained
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert f"<td>{summary['test'][key]:.4f}</td>" in page and f"<td>{summary['baseline'][key]:.4f}</td>" in page
    for member in summary["ensemble"]["members"]:
        assert f"<td>{member['test']['auc']:.4f}</td>" in page
    assert "majority class of the train split" in page and "d_model: 16" in page   # baseline rule, config


def test_interpretation_csvs_cover_every_input_and_add_up(trained_run: Path):
    summary = json.loads((trained_run / "summary.json").read_text())
    observed, known = summary["data"]["observed_features"], summary["data"]["known_features"]
    importance = pd.read_csv(trained_run / "variable_importance.csv")
    past = importance[importance.selection == "past"]
    assert sorted(past.variable) == sorted(observed + known)
    assert past.importance.sum() == pytest.approx(1.0, abs=1e-5)
    assert importance[importance.selection == "future"].importance.sum() == pytest.approx(1.0, abs=1e-5)
    by_symbol = pd.read_csv(trained_run / "variable_importance_by_symbol.csv")
    assert sorted(by_symbol.symbol.unique()) == ["SYN000", "SYN001"]
    assert by_symbol.groupby(["symbol", "selection"]).importance.sum().tolist() == pytest.approx([1.0] * 4, abs=1e-5)
    assert by_symbol.groupby("symbol").num_samples.first().sum() == summary["test"]["num_samples"]
    attention = pd.read_csv(trained_run / "attention_by_lag.csv")
    assert len(attention) == 16 + 1 and attention.attention.sum() == pytest.approx(1.0, abs=1e-5)


def test_test_predictions_reproduce_the_summary(trained_run: Path):
    summary = json.loads((trained_run / "summary.json").read_text())
    frame = pd.read_csv(trained_run / "predictions_test.csv")
    assert len(frame) == summary["test"]["num_samples"]
    members = frame[["member_0_p_up", "member_1_p_up"]].to_numpy()
    assert frame.p_up.to_numpy() == pytest.approx(members.mean(axis=1), abs=1e-7)
    assert frame.p_up_spread.to_numpy() == pytest.approx(abs(members[:, 0] - members[:, 1]) / 2, abs=1e-7)
    assert (frame["class"] == (frame.p_up > 0.5)).all()
    # the CSV holds 8 significant digits: metrics from it equal the summary's to that precision
    metrics = BinaryClassification().metrics(torch.tensor(frame.p_up.to_numpy()), torch.tensor(frame.label),
                                             torch.tensor(frame.actual.to_numpy()), TargetScale())
    assert metrics == pytest.approx(summary["test"], abs=1e-6)


def test_etft_report_rebuilds_the_page(trained_run: Path, tmp_path: Path):
    copy = tmp_path / trained_run.name
    shutil.copytree(trained_run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    (copy / "report.html").unlink()
    (copy / "attention_by_lag.csv").unlink()    # a missing file leaves its section saying so
    result = run_cli(["-m", "enhanced_tft.cli", "report", "--run", str(copy)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    page = (copy / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(FIGURES) - 1 and "attention_by_lag.csv is missing" in page

    (copy / "summary.json").unlink()
    result = run_cli(["-m", "enhanced_tft.cli", "report", "--run", str(copy)], cwd=tmp_path)
    assert result.returncode == 2 and "has no summary.json: not a finished run folder" in result.stderr
    assert "Traceback" not in result.stderr
