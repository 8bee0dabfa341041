"""End to end: the real command lines in subprocesses, then the run folder they leave."""
import json
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli

RUN_FILES = {"training.log", "config.yaml", "metrics.jsonl", "summary.json", "scaler.json"}
SUMMARY_KEYS = {"task", "test", "baseline", "samples_per_s", "peak_memory_bytes", "ensemble"}


def _only_run_folder(log_dir: Path) -> Path:
    runs = sorted(log_dir.glob("training_*"))
    assert len(runs) == 1, runs
    return runs[0]


def _check_run_folder(run: Path, task: str, members: int) -> dict:
    assert RUN_FILES <= {p.name for p in run.iterdir()}
    checkpoints = {p.name for p in (run / "checkpoints").iterdir()}
    for i in range(members):
        assert {f"member_{i}_best.pt", f"member_{i}_result.pt"} <= checkpoints
        resumable = [name for name in checkpoints if name.startswith(f"member_{i}_step_")]
        assert 1 <= len(resumable) <= 2                       # train.keep_checkpoints
    assert not [name for name in checkpoints if name.endswith(".tmp")]
    summary = json.loads((run / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys()
    assert summary["task"] == task
    assert summary["samples_per_s"] > 0 and summary["peak_memory_bytes"] > 2**20
    assert len(summary["ensemble"]["members"]) == members
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["task"] == task and saved["train"]["mixed_precision"] in {"fp32", "bf16", "fp16"}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lines = [r for r in records if r["kind"] == "epoch"]
    assert len(lines) == sum(m["epochs_run"] for m in summary["ensemble"]["members"])
    assert all({"loss/train", "loss/val", "speed/samples_per_s", "memory/peak_bytes"} <= line.keys() for line in lines)
    log = (run / "training.log").read_text()
    assert "member 0 epoch 1/" in log and "test metrics" in log
    return summary


@pytest.mark.slow
def test_seed_entry_point_test_mode(tmp_path: Path):
    """The seed's script in a process of its own, as its users run it."""
    result = run_cli([str(REPO / "train_universal_transformer_v2.py"), "--test_mode", "--task",
                      "classification_binary", "--log_dir", str(tmp_path / "logs"), "--set",
                      "train.max_steps_per_epoch=8"], cwd=tmp_path, process=True)
    assert result.returncode == 0, result.stderr
    summary = _check_run_folder(_only_run_folder(tmp_path / "logs"), "classification_binary", 1)
    for key in ("accuracy", "balanced_accuracy", "auc"):
        assert 0.0 <= summary["test"][key] <= 1.0 and key in summary["baseline"]
    assert summary["baseline"]["balanced_accuracy"] == pytest.approx(0.5)
    config = yaml.safe_load((_only_run_folder(tmp_path / "logs") / "config.yaml").read_text())
    assert config["run"]["test_mode"] is True and config["train"]["epochs"] == 2


@pytest.mark.slow
def test_seed_entry_point_defaults_to_logs_in_the_working_folder(tmp_path: Path):
    result = run_cli([str(REPO / "train_universal_transformer_v2.py"), "--test_mode", "--task", "regression",
                      "--set", "train.epochs=1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = _check_run_folder(_only_run_folder(tmp_path / "logs"), "regression", 1)
    assert {"mae", "rmse"} <= summary["test"].keys() and summary["baseline"]["rule"] == "zero return"


@pytest.mark.slow
def test_etft_ensemble_reports_members_and_the_ensemble(tmp_path: Path):
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--test_mode", "--task", "quantile", "--ensemble_size", "3",
                      "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=8", "--log_dir", str(tmp_path)],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = _check_run_folder(_only_run_folder(tmp_path), "quantile", 3)
    ensemble = summary["ensemble"]
    assert ensemble["size"] == 3 and [m["seed"] for m in ensemble["members"]] == [42, 43, 44]
    member_losses = [m["test"]["quantile_loss"] for m in ensemble["members"]]
    assert len(set(member_losses)) == 3                       # different seeds, different members
    assert summary["test"] == ensemble["test"]
    # averaging quantile predictions cannot be worse than the average member (pinball loss is convex)
    assert ensemble["test"]["quantile_loss"] <= sum(member_losses) / 3 + 1e-9
    assert "ensemble" in result.stderr and "coverage_p10_p90" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--set", "model.num_heads=7"], "model: num_heads=7 does not divide d_model=64"),
    (["--set", "train.batch_size=0"], "train.micro_batch_size=0: Input should be greater than or equal to 1"),
    (["--set", "model.dropout=0.2"], "model.dropout: unknown key"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path: Path, args, message):
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--log_dir", str(tmp_path / "logs"), *args], cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())   # no run folder


def test_unknown_task_flag_lists_the_allowed_tasks(tmp_path: Path):
    result = run_cli([str(REPO / "train_universal_transformer_v2.py"), "--task", "classification"], cwd=tmp_path)
    assert result.returncode == 2
    assert "invalid choice: 'classification'" in result.stderr and "classification_binary" in result.stderr


def test_two_run_folders_in_the_same_second_differ(tmp_path: Path):
    from enhanced_tft.runs import RunFolder
    first, second = RunFolder.create(tmp_path), RunFolder.create(tmp_path)
    assert first.path != second.path
    assert first.path.name.startswith("training_") and second.path.name.startswith(first.path.name[:24])


@pytest.mark.slow
def test_walk_forward_trains_one_run_per_fold_and_compares_them(tmp_path: Path):
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--test_mode", "--set", "data.walk_forward_folds=2",
                      "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=2", "--log_dir", str(tmp_path)],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    runs = sorted(tmp_path.glob("training_*"))
    (report,) = tmp_path.glob("walk_forward_*.json")
    folds = json.loads(report.read_text())
    assert [f["fold"] for f in folds["folds"]] == [0, 1] and [f["run"] for f in folds["folds"]] == [str(r) for r in runs]
    for fold, run in enumerate(runs):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["test"] == folds["folds"][fold]["test"]
        assert f"walk-forward fold {fold} of 2" in (run / "training.log").read_text()
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["fold"] == fold
    accuracy = [f["test"]["accuracy"] for f in folds["folds"]]
    assert folds["mean"]["accuracy"] == pytest.approx(sum(accuracy) / 2)
    # mean and sd over folds of every metric, the model beside LightGBM and the naive rule
    over = folds["over_folds"]
    assert over["model"]["accuracy"]["mean"] == pytest.approx(sum(accuracy) / 2)
    assert over["model"]["accuracy"]["sd"] == pytest.approx(abs(accuracy[0] - accuracy[1]) / 2 ** 0.5)
    lgbm = [f["strong_baseline"]["auc"] for f in folds["folds"]]
    assert over["strong_baseline"]["auc"]["mean"] == pytest.approx(sum(lgbm) / 2)
    assert over["baseline"]["auc"]["mean"] == pytest.approx(0.5)
    blend = [f["blend"]["auc"] for f in folds["folds"]]
    assert over["blend"]["auc"]["mean"] == pytest.approx(sum(blend) / 2)
    assert set(folds["quant_over_folds"]) == {"model", "strong_baseline", "blend"}
    assert "walk-forward test metrics (2 folds), mean +- sd over folds:" in result.stderr
    assert "LightGBM                   blend          naive baseline" in result.stderr
    from matplotlib.image import imread
    assert imread(report.with_suffix(".png")).shape[1] > 600      # a plot beside the JSON
