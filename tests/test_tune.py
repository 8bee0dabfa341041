"""etft tune: real Optuna studies in a real SQLite file, each trial a real (tiny) training through train_run; the
command through cli.main(["tune", ...]) or `python -m enhanced_tft tune` in subprocesses (two at once, one killed)."""
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from conftest import REPO, SHARED_DATA
from enhanced_tft.cli import main as etft_main
from enhanced_tft.config.schema import load_config
from enhanced_tft.runtime.threads import available_cpus
from enhanced_tft.tune.space_file import DEFAULT_SPACE
from enhanced_tft.tune.study import (BEST_CONFIG_YAML, TRIALS_CSV, TUNE_REPORT_HTML, load_space, parse_space,
                                     trial_config)


def tune(args: list[str]) -> int:
    """`etft tune ARGS` in this process."""
    return etft_main(["tune", *args])


# two symbols x 600 bars, d_model 8-16, one block, 2 epochs of 2 steps, no LightGBM: a trial takes seconds
TINY_YAML = """
seed: 7
data: {num_symbols: 2, num_bars: 600, sequence_length: 16}
model: {d_model: 16, num_heads: 2, num_transformer_blocks: 1, ff_dim: 16, variable_hidden_size: 4}
train: {micro_batch_size: 32, epochs: 2, max_steps_per_epoch: 2, log_every_steps: 2, strong_baseline: false}
run: {report: false}
"""
SPACE_YAML = """
model.d_model: {type: categorical, choices: [8, 16]}
train.learning_rate: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
"""


@pytest.fixture
def study_dir(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    (tmp_path / "space.yaml").write_text(SPACE_YAML)
    return tmp_path


def _args(folder, trials: int, *extra: str) -> list[str]:
    return ["--config", str(folder / "tiny.yaml"), "--space", str(folder / "space.yaml"), "--trials", str(trials),
            "--log_dir", str(folder / "logs"), *extra]


def _spawn(folder, trials: int, *extra: str, program: tuple[str, ...] = ("-m", "enhanced_tft")) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((str(REPO / "src"), str(REPO / "tests"))),
               OMP_NUM_THREADS="1")   # two processes share 2 cores
    return subprocess.Popen([sys.executable, *program, "tune", *_args(folder, trials, *extra)],
                            cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _study(folder, name: str = "etft") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'logs' / f'tune_{name}.db'}")


@pytest.mark.slow   # trainings, some in subprocesses
def test_two_processes_share_one_study_of_n_trials_and_write_a_trainable_best_config(study_dir):
    """--trials N is the study's total: two processes on one SQLite file finish 4 trials between them, each trial
    number run by exactly one of them, each in its own run folder."""
    processes = [_spawn(study_dir, 4) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in outputs]
    ran = [[int(n) for n in re.findall(r"trial (\d+) (?:val loss|pruned|fail)", err)] for _, err in outputs]
    assert all(ran), ran                                      # both processes trained trials of the one study
    assert sorted(ran[0] + ran[1]) == list(range(4))          # no trial number twice, none lost

    trials = _study(study_dir).get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in trials)
    table = pd.read_csv(study_dir / "logs" / "tune_etft" / TRIALS_CSV)
    assert table.number.tolist() == [0, 1, 2, 3] and table.state.tolist() == [t.state.name for t in trials]
    for t in trials:   # each trial trained in its own folder, recorded with it
        (run,) = (study_dir / "logs" / "tune_etft" / f"trial_{t.number:04d}").glob("training_*")
        assert t.user_attrs["run"] == str(run.resolve())

    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    best_file = study_dir / "logs" / "tune_etft" / BEST_CONFIG_YAML
    assert f"# best trial {best.number} " in best_file.read_text()
    tuned = load_config(best_file)   # ready for etft train --config
    base = load_config(study_dir / "tiny.yaml", [f"run.log_dir={json.dumps(str(study_dir / 'logs'))}"])
    assert tuned.model.d_model == best.params["model.d_model"]
    assert tuned.train.learning_rate == best.params["train.learning_rate"] != base.train.learning_rate
    assert tuned.model_dump(exclude={"model": {"d_model"}, "train": {"learning_rate"}}) == base.model_dump(
        exclude={"model": {"d_model"}, "train": {"learning_rate"}})   # the rest is the base config
    page = (study_dir / "logs" / "tune_etft" / TUNE_REPORT_HTML).read_text()
    assert "Search history" in page and "data:image/png;base64," in page and "Parameter importances" in page


@pytest.mark.slow   # trainings, some in subprocesses
def test_a_trial_worse_than_the_median_is_pruned_and_an_invalid_config_is_skipped(study_dir):
    """Three earlier trials reported val loss 0 at every epoch: any real trial is above that median at epoch 1,
    so MedianPruner stops it there, deterministically. A queued trial with num_heads=3 (not dividing
    d_model=16) is pruned before any training, with the reason."""
    space = SPACE_YAML.replace("model.d_model: {type: categorical, choices: [8, 16]}",
                               "model.num_heads: {type: categorical, choices: [2, 3]}")
    (study_dir / "space.yaml").write_text(space)
    (study_dir / "logs").mkdir()
    study = optuna.create_study(study_name="etft", storage=f"sqlite:///{study_dir / 'logs' / 'tune_etft.db'}")
    distributions = {"model.num_heads": optuna.distributions.CategoricalDistribution([2, 3]),
                     "train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for lr in (1e-3, 2e-3, 3e-3):
        study.add_trial(optuna.trial.create_trial(params={"model.num_heads": 2, "train.learning_rate": lr},
                                                  distributions=distributions, value=0.0,
                                                  intermediate_values={1: 0.0, 2: 0.0}))
    study.enqueue_trial({"model.num_heads": 3, "train.learning_rate": 1e-3})
    study.enqueue_trial({"model.num_heads": 2, "train.learning_rate": 1e-3})

    assert tune(_args(study_dir, 5)) == 0
    trials = _study(study_dir).get_trials()
    invalid, pruned = trials[3], trials[4]
    assert invalid.state == pruned.state == optuna.trial.TrialState.PRUNED
    assert "num_heads=3 does not divide d_model=16" in invalid.user_attrs["note"] and not invalid.intermediate_values
    assert not (study_dir / "logs" / "tune_etft" / "trial_0003").exists()   # nothing trained
    assert list(pruned.intermediate_values) == [1] and pruned.intermediate_values[1] > 0
    (run,) = (study_dir / "logs" / "tune_etft" / "trial_0004").glob("training_*")
    assert (run / "training.log").is_file() and not (run / "summary.json").exists()   # stopped after epoch 1
    table = pd.read_csv(study_dir / "logs" / "tune_etft" / TRIALS_CSV)
    assert table.state.tolist() == ["COMPLETE"] * 3 + ["PRUNED", "PRUNED"]
    assert table.note[4].startswith("at epoch 1: val loss") and table.run[4] == str(run.resolve())
    # the best trial (a stored one without a config of its own) gives base config + its params
    assert load_config(study_dir / "logs" / "tune_etft" / BEST_CONFIG_YAML).train.learning_rate == 1e-3


@pytest.mark.slow   # trainings, some in subprocesses
def test_a_killed_process_trial_fails_by_heartbeat_is_retried_and_the_study_resumes(study_dir):
    """SIGKILL mid-trial: the trial stays RUNNING until 2 heartbeats (1 s each) go by without news; the next
    `etft tune` on the storage fails it, runs it again as a new trial with its params, keeps the complete trial
    and numbers on."""
    process = _spawn(study_dir, 3, "--heartbeat", "1", program=(str(REPO / "tests" / "held_trial_entry.py"),))
    storage = f"sqlite:///{study_dir / 'logs' / 'tune_etft.db'}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and process.poll() is None:
        try:
            states = [t.state.name for t in optuna.load_study(study_name="etft", storage=storage).get_trials()]
        except (KeyError, Exception):   # the process has not created the study yet
            states = []
        if states[:2] == ["COMPLETE", "RUNNING"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"no second trial started: {process.communicate()[1][-3000:]}")
    process.send_signal(signal.SIGKILL)   # trial 1 is held at its first micro-batch (held_trial_entry.py)
    process.communicate()
    before = _study(study_dir).get_trials()
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    time.sleep(3)     # past the grace period (2 heartbeats); SQLite's clock has whole seconds

    assert tune(_args(study_dir, 3, "--heartbeat", "1")) == 0
    after = _study(study_dir).get_trials()
    assert [t.state.name for t in after] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert (after[0].value, after[0].datetime_complete) == (before[0].value, before[0].datetime_complete)
    retry = after[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == before[1].params
    assert len({t.number for t in after}) == 4                  # numbering went on: 0, 1 (failed), 2, 3
    table = pd.read_csv(study_dir / "logs" / "tune_etft" / TRIALS_CSV)
    assert table.note[1] == "its process stopped (no heartbeat); retried as trial 2"


def test_space_validation_names_the_entry_and_what_is_allowed(tmp_path):
    def error(raw) -> str:
        with pytest.raises(ValueError) as caught:
            parse_space(raw, "space.yaml")
        return str(caught.value)

    message = error({"model.d_modle": {"type": "int", "low": 8, "high": 64}})
    assert "unknown config key 'model.d_modle'" in message and "d_model, num_heads" in message
    message = error({"modle.d_model": {"type": "int", "low": 8, "high": 64}})
    assert "unknown config key 'modle.d_model'" in message and "data, model, train, backtest, run" in message
    assert "low=64 is not below high=8" in error({"model.d_model": {"type": "int", "low": 64, "high": 8}})
    assert "log true needs low > 0" in error({"train.weight_decay": {"type": "float", "low": 0.0, "high": 0.1,
                                                                     "log": True}})
    assert "high=1.5 is not a value of model.dropout_rate: Input should be less than 1" in error(
        {"model.dropout_rate": {"type": "float", "low": 0.0, "high": 1.5}})
    assert "low=8.5; allowed: an integer" in error({"model.d_model": {"type": "int", "low": 8.5, "high": 64}})
    assert "step=5; allowed: a step > 0 that divides high - low" in error(
        {"model.d_model": {"type": "int", "low": 8, "high": 64, "step": 5}})
    assert "choices=[]; allowed: a list of distinct" in error({"model.num_heads": {"type": "categorical",
                                                                                   "choices": []}})
    assert "low not allowed for type categorical" in error({"model.num_heads": {"type": "categorical",
                                                                                "choices": [2], "low": 1}})
    assert "needs a mapping with type int, float or categorical" in error({"model.d_model": {"type": "integer"}})
    assert "data.val_fraction cannot be tuned" in error({"data.val_fraction": {"type": "float", "low": 0.1,
                                                                               "high": 0.2}})
    assert "a mapping of config keys to distributions" in error([1, 2])


def test_bad_arguments_exit_2_with_what_is_allowed(study_dir, capsys):
    assert tune(_args(study_dir, 0)) == 2
    assert "--trials=0; allowed: an integer >= 1" in capsys.readouterr().err
    args = _args(study_dir, 2)
    args[args.index("--space") + 1] = str(study_dir / "nope.yaml")
    assert tune(args) == 2
    assert "--space" in (err := capsys.readouterr().err) and "cannot be read" in err
    assert tune(_args(study_dir, 2, "--storage", "nosuchdb://host/db")) == 2
    err = capsys.readouterr().err
    assert "--storage 'nosuchdb://host/db' cannot be opened" in err and "allowed: a SQLAlchemy URL" in err
    assert tune(_args(study_dir, 2, "--storage", f"sqlite:///{study_dir}/missing/dir/t.db")) == 2
    assert "cannot be opened" in capsys.readouterr().err
    assert not list((study_dir / "logs").glob("tune_etft/trial_*"))   # nothing trained


def test_the_default_space_is_valid_and_each_of_its_configs_builds():
    """configs/tune_space.yaml covers the issue's keys, and num_heads divides every d_model it can draw."""
    space = {p.key: p for p in load_space(DEFAULT_SPACE)}
    assert set(space) == {"model.d_model", "model.num_transformer_blocks", "model.num_heads", "model.dropout_rate",
                          "train.learning_rate", "train.weight_decay", "data.sequence_length", "train.micro_batch_size"}
    assert space["train.learning_rate"].log and space["train.weight_decay"].log
    d_model = space["model.d_model"]
    base = load_config(None)
    for width in range(int(d_model.low), int(d_model.high) + 1, int(d_model.step)):
        for heads in space["model.num_heads"].choices:
            trial_config(base, {"model.d_model": width, "model.num_heads": heads})   # raises if invalid
    assert yaml.safe_load(DEFAULT_SPACE.read_text()).keys() == space.keys()


def _split_plan(cfg):
    from enhanced_tft.data.pipeline import bar_source, split_plan
    return split_plan(cfg, bar_source(cfg))


def _run_score(run) -> float:
    """A run's score as its summary.json gives it: the mean over members of each member's best val loss."""
    members = json.loads((Path(run) / "summary.json").read_text())["ensemble"]["members"]
    return sum(m["best_val_loss"] for m in members) / len(members)


@pytest.mark.slow   # trainings
def test_folds_2_scores_the_mean_of_its_folds_and_no_fold_reaches_the_test_split(study_dir):
    assert tune(_args(study_dir, 2, "--folds", "2")) == 0
    trials = _study(study_dir).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    base = load_config(study_dir / "tiny.yaml")
    (test_lo, test_hi), = {tuple(rows["test"]) for rows in _split_plan(base)["rows"].values()}   # same per symbol
    table = pd.read_csv(study_dir / "logs" / "tune_etft" / TRIALS_CSV)
    for trial, row in zip(trials, table.itertuples()):
        folds = trial.user_attrs["folds"]
        assert [f["fold"] for f in folds] == [0, 1]
        losses = [f["val_loss"] for f in folds]
        assert trial.value == pytest.approx(sum(losses) / 2, rel=1e-12)
        assert (row.fold_0_val_loss, row.fold_1_val_loss) == pytest.approx(losses, rel=1e-12)
        for fold in folds:   # the recorded loss is the fold run's own, and that run trained fold k of 2
            assert fold["val_loss"] == pytest.approx(_run_score(fold["run"]), rel=1e-12)
            assert load_config(Path(fold["run"]) / "config.yaml").data.model_dump(
                include={"walk_forward_folds", "fold"}) == {"walk_forward_folds": 2, "fold": fold["fold"]}
        # every fold trains and validates on rows before the base test split ([lo, hi) ranges); the validation
        # blocks are the last two before it. Fold 1 is the walk-forward cut of the base split: its val block ends at
        # the base test start (the base's purge gap row is its last, by rounding), its test block inside the base's
        for symbol, rows in folds[0]["splits"]["rows"].items():
            later = folds[1]["splits"]["rows"][symbol]
            assert rows["train"][1] <= rows["val"][0] < rows["val"][1] <= later["val"][0] < later["val"][1] <= test_lo
            assert later["train"][1] <= later["val"][0] and rows["test"][1] <= test_lo
            assert test_lo <= later["test"][0] and later["test"][1] == test_hi   # its test metrics: never scored
        assert trial.user_attrs["run"] == folds[1]["run"]
    summary = json.loads((study_dir / "logs" / "tune_etft" / "tune_summary.json").read_text())
    assert summary["folds"] == 2 and summary["objective"].startswith("mean over 2 walk-forward folds")
    assert summary["trial_folds"]["0"] == trials[0].user_attrs["folds"]


def test_bad_folds_exit_2_with_the_allowed_range(study_dir, capsys):
    for folds in ("0", "-1"):
        assert tune(_args(study_dir, 2, "--folds", folds)) == 2
        assert f"--folds={folds}; allowed: 1 to 4 (1 = the one split)" in capsys.readouterr().err
    assert tune(_args(study_dir, 2, "--folds", "5")) == 2   # 0.15 + 5 x 0.15 leaves under 10% to train on
    assert "--folds=5; allowed: 1 to 4 (each fold's validation block" in capsys.readouterr().err
    assert tune(_args(study_dir, 2, "--folds", "4", "--set", "data.test_fraction=0.2")) == 2
    assert "--folds=4; allowed: 1 to 3 (" in capsys.readouterr().err   # 0.15 + 3 x 0.2 = 0.75, 4 x 0.2: 0.95
    assert tune(_args(study_dir, 2, "--folds", "2", "--set", "data.walk_forward_folds=3", "--set",
                      "data.fold=1")) == 2
    assert "the base config already sets data.walk_forward_folds" in capsys.readouterr().err
    assert tune(_args(study_dir, 2, "--workers", "0")) == 2
    assert "--workers=0; allowed: an integer from 1 to 64" in capsys.readouterr().err
    assert tune(_args(study_dir, 2, "--refits", "-1")) == 2
    assert "--refits=-1; allowed: an integer from 0 to 20" in capsys.readouterr().err
    assert not (study_dir / "logs").exists()   # nothing opened, nothing trained


@pytest.mark.slow   # worker processes
def test_two_workers_share_one_study_and_the_parent_refits_the_base_config(study_dir):
    assert tune(_args(study_dir, 4, "--workers", "2", "--refits", "1")) == 0
    study = _study(study_dir)
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    workers = study.user_attrs["workers"]
    assert [(w["index"], w["exit_code"]) for w in workers] == [(0, 0), (1, 0)]
    assert [w["threads"] for w in workers] == [max(1, available_cpus() // 2)] * 2   # the CPUs split between them
    pids = {t.user_attrs["pid"] for t in trials}
    assert pids == {w["pid"] for w in workers} and len(pids) == 2 and os.getpid() not in pids
    refits = study.user_attrs["refits"]   # trained by the parent once the workers were done
    assert [r["seed"] for r in refits] == [7, 8]
    for refit in refits:
        assert refit["value"] == pytest.approx(_run_score(refit["run"]), rel=1e-12)
        assert f"refit_seed_{refit['seed']}" in refit["run"]
    summary = json.loads((study_dir / "logs" / "tune_etft" / "tune_summary.json").read_text())
    assert summary["workers"] == workers and summary["noise"]["seed_noise"]["scores"] == [r["value"] for r in refits]
    page = (study_dir / "logs" / "tune_etft" / TUNE_REPORT_HTML).read_text()
    assert "Worker processes" in page and "Best trial against the seed noise" in page


def _study_with(folder, values: list[float], refits: list[tuple[int, float]]) -> optuna.Study:
    """A study of complete trials with these scores (no training), and the base config's refits."""
    study = optuna.create_study(study_name="etft", storage=f"sqlite:///{folder / 'noise.db'}")
    distribution = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}
    for i, value in enumerate(values):
        study.add_trial(optuna.trial.create_trial(params={"train.learning_rate": 1e-3 * (i + 1)},
                                                  distributions=distribution, value=value))
    if refits:
        study.set_user_attr("refits", [{"seed": s, "value": v, "run": ""} for s, v in refits])
    return study


def test_the_report_says_when_the_best_trial_is_within_the_seed_noise(tmp_path):
    from enhanced_tft.tune.outputs import write_outputs
    base = load_config(None, ["seed=7"])
    folder = tmp_path / "tune_etft"
    folder.mkdir()
    # base 0.695 (seed 7) and 0.715 (seed 8): mean 0.705, sd 0.02 / sqrt(2) = 0.0141421, threshold 2 sd = 0.0282843;
    # trials 0.700, 0.701, 0.702: best - base = -0.005, range 0.002, both inside it
    write_outputs(_study_with(tmp_path, [0.702, 0.700, 0.701], [(7, 0.695), (8, 0.715)]), folder, base)
    noise = json.loads((folder / "tune_summary.json").read_text())["noise"]
    assert noise["seed_noise"]["sd"] == pytest.approx(0.02 / math.sqrt(2), rel=1e-9)
    assert noise["best_minus_base"] == pytest.approx(-0.005, abs=1e-12)
    assert (noise["distinguishable"], noise["all_trials_within_noise"]) == (False, True)
    assert noise["trials"]["sd"] == pytest.approx(0.001, rel=1e-9) and noise["trials"]["range"] == pytest.approx(0.002)
    page = (folder / TUNE_REPORT_HTML).read_text()
    assert ("<b>the best trial is not distinguishable from the base config: best - base = -0.005 (base: mean over 2 "
            "seeds 0.705); seed noise: sd 0.0141, 2 sd = 0.0283. All 3 complete trials lie within the seed noise of "
            "each other (range 0.002)") in page
    # a best trial 0.1 below a base whose seeds agree to 1e-4 stands out
    (tmp_path / "b").mkdir()
    write_outputs(_study_with(tmp_path / "b", [0.6, 0.7], [(7, 0.7), (8, 0.7001)]), folder, base)
    noise = json.loads((folder / "tune_summary.json").read_text())["noise"]
    assert (noise["distinguishable"], noise["all_trials_within_noise"]) == (True, False)
    assert "<b>the best trial beats the base config by more than the seed noise: best - base = -0.10005" in (
        folder / TUNE_REPORT_HTML).read_text()
    (tmp_path / "c").mkdir()
    write_outputs(_study_with(tmp_path / "c", [0.6, 0.7], []), folder, base)
    assert "<b>seed noise not measured (etft tune --refits R" in (folder / TUNE_REPORT_HTML).read_text()


@pytest.mark.slow   # worker processes
def test_sigterm_to_the_parent_reaches_every_worker_and_their_exits_are_reported(study_dir):
    """Each worker gets the signal once (they run in sessions of their own), stops its trial at a checkpoint and
    exits 143; the parent waits for both, reports each exit and exits 143."""
    parent = _spawn(study_dir, 8, "--workers", "2", "--set", "train.epochs=50", "--set", "train.max_steps_per_epoch=50",
                    "--set", "train.early_stopping_patience=50")
    storage = f"sqlite:///{study_dir / 'logs' / 'tune_etft.db'}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and parent.poll() is None:
        try:
            running = [t for t in optuna.load_study(study_name="etft", storage=storage).get_trials()
                       if t.state.name == "RUNNING" and "pid" in t.user_attrs]
        except Exception:   # the study is not created yet
            running = []
        if len({t.user_attrs["pid"] for t in running}) == 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the two workers did not both start a trial: {parent.communicate()[1][-3000:]}")
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=120)
    assert parent.returncode == 143, err[-3000:]
    workers = _study(study_dir).user_attrs["workers"]
    assert [w["exit_code"] for w in workers] == [143, 143]
    for w in workers:
        assert f"worker {w['index']} (pid {w['pid']}) exited 143" in err
    assert err.count("SIGTERM: forwarded to the workers") == 1
    stopped = [t for t in _study(study_dir).get_trials() if t.state.name == "FAIL"]
    assert len(stopped) == 2 and all(t.user_attrs["note"].startswith("stopped by SIGTERM; resumable") for t in stopped)
    assert {t.user_attrs["pid"] for t in stopped} == {w["pid"] for w in workers}


def test_a_study_keeps_its_folds(study_dir, capsys):
    """Scores of 1 and of 2 folds do not compare: a study begun with one (here a study of an older version, with
    trials but no record of its folds) refuses --folds 2 before training anything."""
    (study_dir / "logs").mkdir()
    study = optuna.create_study(study_name="etft", storage=f"sqlite:///{study_dir / 'logs' / 'tune_etft.db'}")
    study.add_trial(optuna.trial.create_trial(
        params={"train.learning_rate": 1e-3}, value=0.7,
        distributions={"train.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}))
    assert tune(_args(study_dir, 2, "--folds", "2")) == 2
    assert ("study 'etft' was started with --folds 1; its trials would not compare with --folds 2. Use --folds 1, or "
            "another --study") in capsys.readouterr().err
    assert not list((study_dir / "logs").glob("tune_etft/trial_*"))


def test_folds_of_real_daily_stocks_are_cut_at_shared_dates_before_the_test_split():
    """data.split=time on a file: each fold's cut dates (shared by every symbol) lie before the base test split's
    start, its validation blocks one test block apart, the last fold's test start the base's own."""
    from enhanced_tft.data.pipeline import bar_source, split_plan
    from enhanced_tft.tune.study import fold_configs, max_folds
    path = SHARED_DATA / "us_stocks_daily_5sym_2000_2013_quandl_wiki_pd.csv.gz"
    if not path.is_file():
        pytest.skip(f"real market data {path.name} not found in {SHARED_DATA} (the shared data folder beside the "
                    "project is absent in a fresh clone)")
    base = load_config(None, ["data.source=file", f"data.path={json.dumps(str(path))}", "data.adjust_column=adj_close"])
    assert max_folds(base) == 4   # 0.15 + 4 x 0.15 = 0.75; 5 folds would leave 10%
    source = bar_source(base)
    test_start = pd.Timestamp(split_plan(base, source)["cut_dates"]["test_start"])
    cuts = [split_plan(cfg, source)["cut_dates"] for cfg in fold_configs(base, 3)]   # the last fold first
    assert [cfg.data.fold for cfg in fold_configs(base, 3)] == [2, 1, 0]
    starts = [(pd.Timestamp(c["val_start"]), pd.Timestamp(c["test_start"])) for c in cuts]
    assert starts[0][1] == test_start and cuts[0]["end"] is None       # the last fold: the base split
    for (val_start, val_end), later in zip(starts[1:], starts):        # each fold a block before the next
        assert val_start < val_end <= later[0] < test_start
    assert pd.Timestamp(cuts[2]["end"]) == starts[1][1] <= test_start  # fold 0's own test block ends before it
