"""etft tune: real Optuna studies in a real SQLite file, each trial a real (tiny) training through train_run; the
command through cli.main(["tune", ...]) or `python -m enhanced_tft tune` in subprocesses (two at once, one killed)."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml

from conftest import REPO
from enhanced_tft.cli import main as etft_main
from enhanced_tft.config.schema import load_config
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
