"""One place for each concept: a new task is one class; task names, run-folder file names and the atomic
writer each live in one module; user errors exit 2 and internal errors exit 1 with their traceback."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import REPO
from enhanced_tft import tasks
from enhanced_tft.cli import main

SRC = REPO / "src" / "enhanced_tft"


class DownMove(tasks.Task):
    """P(the next move is down): a classifier the package does not ship, defined here alone."""
    name = "down_move_test"
    columns = ("p_down",)
    probabilities = True
    main_metric = "brier"
    spread = ("p_down_spread", "std of the members' P(down)")

    def make_targets(self, forward_target, forward_return, target_scale, dead_zone):
        return (forward_return < 0).astype(np.float32)

    def loss(self, output_BO, target_B):
        return torch.nn.functional.binary_cross_entropy_with_logits(output_BO.float()[:, 0], target_B,
                                                                    reduction="none")

    def predict(self, output_BO):
        return torch.sigmoid(output_BO.float()[:, 0])

    def metrics(self, prediction, target, raw, scale):
        prediction, target = prediction.float().cpu(), target.float().cpu()
        return {"brier": float((prediction - target).pow(2).mean()),
                "hit_rate": float(((prediction > 0.5).float() == target).float().mean()),
                "num_samples": int(target.numel())}

    def baseline(self, train_target, train_raw, scale):
        return train_target.float().mean()        # the train frequency of down moves, every sample

    def baseline_rule(self):
        return "train frequency of down moves"

    def hard_class(self, mean_BO):
        return mean_BO[:, 0] > 0.5


@pytest.fixture
def down_move_task():
    tasks.register(DownMove)
    yield DownMove
    tasks.REGISTRY.pop(DownMove.name)


@pytest.mark.slow
def test_a_registered_task_trains_predicts_evaluates_and_reports(down_move_task, tmp_path, capsys, monkeypatch):
    """train, predict, evaluate and report on a task class defined in this test, no package file changed."""
    monkeypatch.chdir(tmp_path)
    code = main(["train", "--test_mode", "--task", "down_move_test", "--log_dir", str(tmp_path / "logs"),
                 "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=4", "--ensemble_size", "2"])
    assert code == 0
    (run,) = (tmp_path / "logs").glob("training_*")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "down_move_test" and set(summary["test"]) == {"brier", "hit_rate", "num_samples"}
    assert summary["baseline"]["rule"] == "train frequency of down moves"
    assert 0.3 < summary["baseline"]["output"] < 0.7                       # a frequency, fitted on train
    assert 0.0 < summary["test"]["brier"] < 0.5
    test_csv = pd.read_csv(run / "predictions_test.csv")
    assert list(test_csv.columns) == ["symbol", "timestamp", "actual", "label", "p_down", "class", "p_down_spread",
                                      "member_0_p_down", "member_1_p_down"]
    assert ((test_csv.label == 1) == (test_csv.actual < 0)).all()        # the task's own targets
    assert len(test_csv) == summary["test"]["num_samples"]

    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "p.csv")]) == 0
    predicted = pd.read_csv(tmp_path / "p.csv")
    assert np.allclose(predicted.p_down, test_csv.p_down, atol=1e-7)

    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["test"] == summary["test"] and scored["baseline"]["brier"] == summary["baseline"]["brier"]

    (run / "report.html").unlink()
    assert main(["report", "--run", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert "train frequency of down moves" in page and "Calibration" in page and "brier" in page


def _python_sources(exclude: str) -> list[Path]:
    return [p for p in SRC.rglob("*.py") if p.name != exclude]


def test_no_module_but_tasks_branches_on_a_task_name():
    names = "|".join(map(re.escape, tasks.names()))
    branching = re.compile(rf"""(==|!=|\bin\b|startswith\()\s*\(?\s*["'](?:{names}|classification)""")
    keyed = re.compile(rf"""["'](?:{names})["']\s*:""")      # dicts keyed by task name
    found = [f"{p.relative_to(SRC)}:{i}: {line.strip()}" for p in _python_sources("tasks.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if branching.search(line) or keyed.search(line)]
    assert found == []


def test_only_runs_py_names_the_run_folders_files():
    # a file name as a string of its own (prose that mentions one is fine), or a checkpoint's name pattern
    names = re.compile(r"""["'](?:summary\.json|scaler\.json|config\.yaml|metrics\.jsonl|training\.log|report\.html|"""
                       r"""predictions(?:_test)?\.(?:csv|parquet)|variable_importance[a-z_]*\.csv|attention_by_lag\.csv|"""
                       r"""checkpoints)["']|member_\{[^}]*\}_(?:best|step|result)""")
    found = [f"{p.relative_to(SRC)}:{i}" for p in _python_sources("runs.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if names.search(line)]
    assert found == []
    # and one writer: no other module renames files into place or fsyncs
    writers = [f"{p.relative_to(SRC)}" for p in _python_sources("runs.py") if re.search(r"os\.(replace|fsync)\(", p.read_text())]
    assert writers == []


def test_test_mode_comes_before_set_so_the_users_values_win(tmp_path):
    from enhanced_tft.config.schema import load_config
    cfg = load_config(None, ["train.epochs=5", "model.d_model=48"], test_mode=True)
    assert (cfg.train.epochs, cfg.model.d_model) == (5, 48)                   # the user's --set
    assert cfg.run.test_mode and cfg.model.num_transformer_blocks == 1        # the rest of the smoke run
    assert cfg.data.num_bars == 800 and cfg.train.micro_batch_size == 32


def test_a_bug_keeps_its_traceback_and_exits_1_while_bad_input_exits_2(monkeypatch, capsys, tmp_path):
    from enhanced_tft import api

    def broken(*args, **kwargs):
        raise ValueError("operands could not be broadcast together")   # what a numpy bug looks like
    monkeypatch.setattr(api, "plan_step", broken)
    assert main(["plan"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "operands could not be broadcast" in err
    assert "internal error: this is a bug in Enhanced TFT, not in your input: please report it" in err
    assert main(["plan", "--gpu-memory", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("etft plan: error: --gpu-memory='lots' is not a memory size") and "Traceback" not in err


def test_plan_counts_parameters_not_bytes():
    from enhanced_tft.config.schema import build_config
    from enhanced_tft.model.build import build_model
    from enhanced_tft.training.plan_report import plan_dims
    from enhanced_tft.training.planner import plan
    cfg = build_config({"model": {"d_model": 16, "num_heads": 2, "ff_dim": 32, "variable_hidden_size": 4},
                        "train": {"micro_batch_size": 4}, "data": {"sequence_length": 8}})
    dims = plan_dims(cfg)
    expected = sum(p.numel() for p in build_model(cfg.model, dims, 1).parameters())
    result = plan(cfg, dims)
    assert result["num_parameters"] == expected
    assert result["options"][0]["parameters"] >= 4 * expected                  # bytes, rounded up per tensor


def test_changing_epochs_on_resume_keeps_the_learning_rate_continuous(small_raw, caplog):
    from test_trainer import make_trainer
    small_raw["train"].update(epochs=2, max_steps_per_epoch=6, warmup_fraction=0.0)
    first, data = make_trainer(small_raw)
    for _ in range(8):   # into the second epoch of the 12-step schedule
        first.train_window(data.splits["train"], torch.arange(32))
        first.optimizer_step()
        first.global_step += 1
    state = first.train_state()
    lr_at_stop = first.scheduler.get_last_lr()[0]
    small_raw["train"]["epochs"] = 4                                          # 24 steps in all now
    resumed, _ = make_trainer(small_raw, data)
    with caplog.at_level("INFO"):
        resumed.load_train_state(state)
    assert "24 optimizer steps in all now (was 12)" in caplog.text
    lrs = [resumed.scheduler.get_last_lr()[0]]
    for _ in range(16):
        resumed.scheduler.step()
        lrs.append(resumed.scheduler.get_last_lr()[0])
    assert lrs[0] == pytest.approx(lr_at_stop, rel=1e-12)                     # no jump at the resume
    steps = np.abs(np.diff(lrs))
    assert steps.max() < 0.1 * lr_at_stop                                     # and none after it
    assert all(b <= a + 1e-15 for a, b in zip(lrs, lrs[1:]))                  # still decaying
    peak, floor = small_raw["train"].get("learning_rate", 2e-3), 0.05
    assert lrs[-1] == pytest.approx(peak * floor, rel=1e-9)                   # min_lr_ratio at the new last step

    # a later resume with the same epochs rebuilds the continued schedule from the checkpoint, not a fresh one
    again, _ = make_trainer(small_raw, data)
    replay, _ = make_trainer(small_raw, data)
    replay.load_train_state(state)
    for _ in range(4):
        replay.scheduler.step()
    again.load_train_state(replay.train_state())
    for _ in range(8):
        assert again.scheduler.get_last_lr()[0] == replay.scheduler.get_last_lr()[0] == lrs[4 + _]
        again.scheduler.step()
        replay.scheduler.step()
