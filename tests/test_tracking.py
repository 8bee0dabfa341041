"""run.tracking: what MLflow and TensorBoard receive is what the run folder holds. Real libraries, real tiny runs;
each test reads back the store or the event files and compares them with metrics.jsonl and summary.json."""
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from conftest import run_cli

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")

from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from enhanced_tft.cli import main  # noqa: E402
from enhanced_tft.config.schema import build_config, load_config, resume_config
from enhanced_tft.errors import ConfigError
from enhanced_tft.tracking.tracker import INSTALL, missing_library  # noqa: E402

TINY = {"seed": 7, "data": {"num_symbols": 2, "num_bars": 700, "sequence_length": 16},
        "model": {"d_model": 16, "num_heads": 2, "num_transformer_blocks": 1, "ff_dim": 32, "variable_hidden_size": 4,
                  "dropout_rate": 0.0},
        "train": {"micro_batch_size": 32, "epochs": 2, "max_steps_per_epoch": 8, "log_every_steps": 4,
                  "strong_baseline": False}}


def _yaml(folder: Path, **sections) -> Path:
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _records(run: Path, member: int, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["member"] == member and r["kind"] == kind]


def _store(run: Path) -> tuple[MlflowClient, dict]:
    """The client of the store tracking.json names, and what it names (uri, run_id, members)."""
    state = json.loads((run / "tracking.json").read_text())["mlflow"]
    return MlflowClient(tracking_uri=state["uri"]), state


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)]


def _scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return [(s.step, s.value) for s in events.Scalars(tag)]


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made once (MLflow takes seconds to create them): tests copy it to
    LOG_DIR/mlflow.db, the default store, where a run then creates its experiment as it would in a new one."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """`etft train` of an ensemble of two (with LightGBM and the quant numbers) tracked by both backends, in a
    fresh log folder, from another working folder (which must not receive an ./mlruns)."""
    folder = tmp_path_factory.mktemp("tracked")
    config = _yaml(folder, train={"ensemble_size": 2, "strong_baseline": True},
                   run={"tracking": ["mlflow", "tensorboard"]})
    (folder / "cwd").mkdir()
    previous = os.getcwd()
    os.chdir(folder / "cwd")
    try:
        code = main(["train", "--config", str(config), "--log_dir", str(folder / "logs")])
    finally:
        os.chdir(previous)
    (run,) = (folder / "logs").glob("training_*")
    assert code == 0, (run / "training.log").read_text()[-3000:]
    assert list((folder / "cwd").iterdir()) == []
    return run


def test_mlflow_holds_the_config_records_summary_and_files_of_the_run_folder(tracked_run):
    run, logs = tracked_run, tracked_run.parent
    client, state = _store(run)
    assert state["uri"] == f"sqlite:///{logs.resolve() / 'mlflow.db'}"
    experiment = client.get_experiment_by_name("enhanced_tft")
    assert experiment.artifact_location == (logs / "mlartifacts").resolve().as_uri()
    parent = client.get_run(state["run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == run.name
    assert parent.data.tags["etft.run_folder"] == str(run.resolve())

    def flat(tree, prefix=""):
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict) and key != "columns":
                out.update(flat(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
        return out
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert parent.data.params == flat(saved)
    assert parent.data.params["data.sequence_length"] == "16" and parent.data.params["run.mlflow_uri"] == "null"

    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{state['run_id']}'")
    assert sorted(c.info.run_name for c in children) == ["member_0", "member_1"]
    summary = json.loads((run / "summary.json").read_text())
    for child in children:
        member = int(child.info.run_name.removeprefix("member_"))
        assert state["members"][str(member)] == child.info.run_id and child.info.status == "FINISHED"
        epochs, windows = _records(run, member, "epoch"), _records(run, member, "window")
        assert len(epochs) == 2 and len(windows) == 2                  # 8 steps per epoch, a window every 4
        assert _history(client, child.info.run_id, "loss/val") == [(r["epoch"], r["loss/val"]) for r in epochs]
        assert _history(client, child.info.run_id, "val/auc") == [(r["epoch"], r["val/auc"]) for r in epochs]
        assert _history(client, child.info.run_id, "window/loss/train") == [
            (i, r["loss/train"]) for i, r in enumerate(windows, 1)]
        record = summary["ensemble"]["members"][member]
        assert child.data.metrics["test/auc"] == record["test"]["auc"]
        assert child.data.metrics["best_val_loss"] == record["best_val_loss"]

    metrics = parent.data.metrics
    assert {k: metrics[f"test/{k}"] for k in summary["test"]} == summary["test"]
    assert metrics["baseline/balanced_accuracy"] == summary["baseline"]["balanced_accuracy"]
    assert metrics["mean_member/auc"] == summary["ensemble"]["mean_member"]["auc"]
    strong = summary["strong_baseline"]["test"]
    assert {k: metrics[f"strong_baseline/{k}"] for k in strong} == strong
    sign = summary["quant"]["model"]["backtest"]["sign"]
    assert metrics["quant/model/backtest/sign/sharpe"] == sign["sharpe"]
    assert metrics["best_val_loss"] == pytest.approx(
        sum(m["best_val_loss"] for m in summary["ensemble"]["members"]) / 2, abs=1e-12)

    top = {a.path for a in client.list_artifacts(state["run_id"])}
    assert {"config.yaml", "summary.json", "metrics.jsonl", "training.log", "tracking.json", "checkpoints"} <= top
    saved_weights = {a.path for a in client.list_artifacts(state["run_id"], "checkpoints")}
    assert saved_weights == {f"checkpoints/member_{m}_{kind}.pt" for m in (0, 1) for kind in ("best", "result")}
    copy = logs / "mlartifacts" / state["run_id"] / "artifacts" / "summary.json"
    assert copy.read_bytes() == (run / "summary.json").read_bytes()


def test_tensorboard_scalars_are_the_records_of_metrics_jsonl(tracked_run):
    run = tracked_run
    board = run / "tensorboard"
    for member in (0, 1):
        epochs, windows = _records(run, member, "epoch"), _records(run, member, "window")
        for key in ("loss/val", "loss/train", "val/auc"):
            got = _scalars(board / f"member_{member}", key)
            assert [s for s, _ in got] == [r["epoch"] for r in epochs]
            assert [v for _, v in got] == pytest.approx([r[key] for r in epochs], rel=1e-6)   # stored as float32
        got = _scalars(board / f"member_{member}", "window/loss/train")
        assert got == [(i, pytest.approx(r["loss/train"], rel=1e-6)) for i, r in enumerate(windows, 1)]
    summary = json.loads((run / "summary.json").read_text())
    for key in ("accuracy", "auc", "balanced_accuracy"):
        assert _scalars(board, f"test/{key}") == [(0, pytest.approx(summary["test"][key], rel=1e-6))]


def _train_in_process(config: Path, logs: Path, epoch_hook) -> int:
    """`etft train` in this process with the CLI's signal handlers (the library installs none)."""
    from enhanced_tft.runs import setup_console_logging
    from enhanced_tft.runtime.signals import install_signal_handlers, restore_signal_handlers
    from enhanced_tft.training.recipe import TrainRequest, train
    setup_console_logging()
    previous = install_signal_handlers()
    try:
        return train(load_config(config, [f"run.log_dir={logs}"]), TrainRequest(epoch_hook=epoch_hook))
    finally:
        restore_signal_handlers(previous)


def test_a_stopped_run_is_killed_and_its_resume_continues_the_same_mlflow_run(tmp_path, empty_store):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(empty_store, logs / "mlflow.db")
    config = _yaml(tmp_path, train={"checkpoint_every_steps": 100}, run={"tracking": ["mlflow"]})

    def sigterm_after_epoch_1(record):   # the real signal path: the CLI's handler, a checkpoint, exit 143
        if record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    assert _train_in_process(config, logs, sigterm_after_epoch_1) == 143
    (run,) = logs.glob("training_*")
    client, state = _store(run)
    first = _records(run, 0, "epoch")
    assert client.get_run(state["run_id"]).info.status == "KILLED"
    assert _history(client, state["run_id"], "loss/val") == [(1, first[0]["loss/val"])]

    # tracking may change on resume: TensorBoard, new to the run, first replays epoch 1 from metrics.jsonl
    assert main(["train", "--resume", str(run), "--set", "run.tracking=[mlflow, tensorboard]"]) == 0
    epochs = _records(run, 0, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"] == state["run_id"]
    resumed = client.get_run(state["run_id"])
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_with.run.tracking"] == '["mlflow", "tensorboard"]'
    assert _history(client, state["run_id"], "loss/val") == [(r["epoch"], r["loss/val"]) for r in epochs]
    assert len(client.search_runs([resumed.info.experiment_id])) == 1
    board = _scalars(run / "tensorboard", "loss/val")
    assert board == [(r["epoch"], pytest.approx(r["loss/val"], rel=1e-6)) for r in epochs]


def test_a_failed_run_is_marked_failed(tmp_path, empty_store):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(empty_store, logs / "mlflow.db")
    config = _yaml(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 2}, run={"tracking": ["mlflow"]})

    def fail(record):
        raise RuntimeError("a bug in epoch 1")
    with pytest.raises(RuntimeError, match="a bug in epoch 1"):
        _train_in_process(config, logs, fail)
    (run,) = logs.glob("training_*")
    client, state = _store(run)
    assert client.get_run(state["run_id"]).info.status == "FAILED"


def test_a_store_that_breaks_mid_run_is_warned_about_once_and_training_goes_on(tmp_path, empty_store):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(empty_store, logs / "mlflow.db")
    config = _yaml(tmp_path, run={"tracking": ["mlflow", "tensorboard"]})

    def break_the_store(record):
        if record["epoch"] == 1:
            (logs / "mlflow.db").write_bytes(b"not a database " * 500)
    assert _train_in_process(config, logs, break_the_store) == 0
    (run,) = logs.glob("training_*")
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    epochs = _records(run, 0, "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    log = (run / "training.log").read_text()
    assert log.count("tracking: mlflow failed") == 1 and "training goes on without it" in log
    assert "tracking: tensorboard failed" not in log    # the other backend kept every record
    assert [s for s, _ in _scalars(run / "tensorboard", "loss/val")] == [1, 2]


def test_a_missing_library_is_a_user_error_naming_the_pip_command_before_any_training(tmp_path):
    assert missing_library("mlflow") is None and missing_library("tensorboard") is None
    message = missing_library("tensorboard", "enhanced_tft_no_such_module")
    assert INSTALL == 'pip install "enhanced-tft[tracking]"' and INSTALL in message and "'tensorboard'" in message
    blocked = ("import sys; sys.modules['mlflow'] = None\nfrom enhanced_tft.cli import main\n"
               f"sys.exit(main(['train', '--test_mode', '--log_dir', {str(tmp_path / 'logs')!r}, "
               "'--set', 'run.tracking=[tensorboard, mlflow]']))")
    result = run_cli(["-c", blocked], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert 'pip install "enhanced-tft[tracking]"' in result.stderr and "'mlflow'" in result.stderr
    assert "Traceback" not in result.stderr and "epoch" not in result.stderr
    assert not (tmp_path / "logs").exists()


def test_tracking_keys_are_validated_and_may_change_on_resume():
    with pytest.raises(ConfigError, match=r"run\.tracking\.0.*'mlflow' or 'tensorboard'"):
        build_config({"run": {"tracking": ["wandb"]}})
    with pytest.raises(ConfigError, match=r"run\.mlflow_experiment"):
        build_config({"run": {"mlflow_experiment": ""}})
    cfg, changed = resume_config(build_config({}), ["run.tracking=[tensorboard]", "run.mlflow_experiment=other"])
    assert cfg.run.tracking == ["tensorboard"] and changed == ["run.tracking", "run.mlflow_experiment"]


@pytest.mark.slow
def test_walk_forward_is_a_parent_run_with_one_nested_run_per_fold(tmp_path, empty_store):
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(empty_store, logs / "mlflow.db")
    config = _yaml(tmp_path, data={"walk_forward_folds": 2, "test_fraction": 0.1},
                   train={"epochs": 1, "max_steps_per_epoch": 4}, run={"tracking": ["mlflow"]})
    assert main(["train", "--config", str(config), "--log_dir", str(logs)]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{logs.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("enhanced_tft").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`etft.group` = 'walk_forward'")
    assert parent.info.status == "FINISHED" and parent.data.params["data.walk_forward_folds"] == "2"
    folds = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted((f.info.run_name, f.data.params["data.fold"], f.info.status) for f in folds) == [
        ("fold_0", "0", "FINISHED"), ("fold_1", "1", "FINISHED")]
    (out,) = logs.glob("walk_forward_*.json")
    summary = json.loads(out.read_text())
    for key, stats in summary["over_folds"]["model"].items():
        if stats["mean"] is not None:
            assert parent.data.metrics[f"model/{key}/mean"] == stats["mean"]
            assert parent.data.metrics[f"model/{key}/sd"] == stats["sd"]
    for fold in folds:
        record = next(r for r in summary["folds"] if r["fold"] == int(fold.data.params["data.fold"]))
        assert fold.data.metrics["test/auc"] == record["test"]["auc"]
    assert out.name in {a.path for a in client.list_artifacts(parent.info.run_id)}


@pytest.mark.slow
def test_a_tune_study_is_a_parent_run_with_one_nested_run_per_trial(tmp_path, empty_store):
    pytest.importorskip("optuna")
    logs = tmp_path / "logs"
    logs.mkdir()
    shutil.copy(empty_store, logs / "mlflow.db")
    config = _yaml(tmp_path, train={"epochs": 1, "max_steps_per_epoch": 4}, run={"tracking": ["mlflow"]})
    space = tmp_path / "space.yaml"
    space.write_text("train.learning_rate: {type: float, low: 0.001, high: 0.01, log: true}\n")
    assert main(["tune", "--config", str(config), "--space", str(space), "--trials", "2", "--study", "tiny",
                 "--log_dir", str(logs)]) == 0
    client = MlflowClient(tracking_uri=f"sqlite:///{logs.resolve() / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("enhanced_tft").experiment_id
    (study,) = client.search_runs([experiment], "tags.`etft.group` = 'study_tiny'")
    assert study.info.status == "FINISHED"
    trials = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{study.info.run_id}'")
    assert sorted(t.info.run_name for t in trials) == ["trial_0000", "trial_0001"]
    import pandas as pd
    table = pd.read_csv(logs / "tune_tiny" / "trials.csv")
    for trial in trials:
        row = table[table["number"] == int(trial.info.run_name.removeprefix("trial_"))].iloc[0]
        assert trial.info.status == "FINISHED"
        assert trial.data.metrics["best_val_loss"] == pytest.approx(row["value"], rel=1e-12)
        assert float(trial.data.params["train.learning_rate"]) == pytest.approx(row["train.learning_rate"])
