"""Never lose a run: exact resume from a mid-epoch checkpoint, NaN guard, safe and atomic checkpoints."""
import io
import pickle

import pytest
import torch
from test_trainer import make_trainer

from enhanced_tft.errors import CheckpointError, NonFiniteGiveUp, StorageError
from enhanced_tft.runs import RunFolder, load_checkpoint, save_checkpoint
from enhanced_tft.training.checkpoint import FORMAT_VERSION, TrainState, load_step, save_step


def _snapshot(state) -> dict:
    """A deep copy through serialisation, as a checkpoint file would hold it (a TrainState, or best weights)."""
    buffer = io.BytesIO()
    torch.save(state.to_dict() if isinstance(state, TrainState) else state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.fixture
def resume_raw(small_raw):
    small_raw["model"]["dropout_rate"] = 0.3       # dropout draws from the RNG: resume must restore it
    small_raw["train"].update(epochs=3, checkpoint_every_steps=4, early_stopping_patience=5)
    return small_raw


def test_resume_from_a_mid_epoch_checkpoint_ends_with_identical_weights(resume_raw):
    full, data = make_trainer(resume_raw)
    events = []   # checkpoints and best-weight files, in the order a run folder would receive them
    full.on_checkpoint = lambda state: events.append(("checkpoint", _snapshot(state)))
    full.on_best = lambda state, epoch: events.append(("best", _snapshot(state)))
    records = []
    full.on_epoch_end = records.append
    expected = full.fit()
    at = next(i for i, (kind, s) in enumerate(events)
              if kind == "checkpoint" and s["progress"]["epoch"] == 2 and s["progress"]["step_in_epoch"] > 0)
    mid = events[at][1]
    best_file = [s for kind, s in events[:at] if kind == "best"][-1]

    resumed, _ = make_trainer(resume_raw, data, seed=123)   # a different init: everything must come from the files
    resumed.load_train_state(TrainState.from_dict(mid, "the mid-epoch snapshot"), best_file)
    resumed_records = []
    resumed.on_epoch_end = resumed_records.append
    result = resumed.fit()

    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert result.best_val_loss == pytest.approx(expected.best_val_loss, abs=1e-9)
    assert result.best_epoch == expected.best_epoch and result.optimizer_steps == expected.optimizer_steps
    epoch_rows = [r for r in records if r["kind"] == "epoch"]
    resumed_rows = [r for r in resumed_records if r["kind"] == "epoch"]
    assert [r["epoch"] for r in resumed_rows] == [2, 3]
    for a, b in zip(epoch_rows[1:], resumed_rows):
        assert b["loss/train"] == pytest.approx(a["loss/train"], abs=1e-7)
        assert b["loss/val"] == pytest.approx(a["loss/val"], abs=1e-7)


def test_nan_steps_are_skipped_and_counted(resume_raw, caplog):
    resume_raw["model"]["dropout_rate"] = 0.0
    trainer, _ = make_trainer(resume_raw)
    original = trainer.task.loss
    poisoned = {2, 3}

    def loss(output, target):
        values = original(output, target)
        return values * float("nan") if trainer.global_step in poisoned else values
    trainer.task.loss = loss
    before = None
    with caplog.at_level("WARNING"):
        for _ in range(4):   # steps 0..3 by hand: the weights must not move on the poisoned ones
            split = trainer.data.splits["train"]
            if trainer.global_step == 2:
                before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
            trainer.train_window(split, torch.arange(32))
            trainer.optimizer_step()
            trainer.global_step += 1
    for name, weight in trainer.model.state_dict().items():
        assert torch.equal(weight, before[name]), name
    assert trainer.progress.nonfinite_steps == 2 and trainer.skipped_steps == 2
    assert "NaN/inf loss or gradient, step skipped (2 in a row, 2 in all)" in caplog.text
    trainer.task.loss = original
    trainer.fit()
    assert trainer.progress.nonfinite_in_a_row == 0


def test_nan_every_step_stops_the_run_with_advice(resume_raw):
    resume_raw["train"]["max_nonfinite_steps"] = 3
    trainer, _ = make_trainer(resume_raw)
    original = trainer.task.loss
    trainer.task.loss = lambda output, target: original(output, target) * float("inf")
    with pytest.raises(NonFiniteGiveUp, match="3 optimizer steps in a row had NaN/inf") as err:
        trainer.fit()
    assert "train.learning_rate" in str(err.value)
    assert trainer.global_step == 2   # the third bad step raised before it was counted


class _Exploit:
    def __reduce__(self):
        return (exec, ("open('PWNED', 'w').write('x')",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"model": _Exploit()}, handle)
    with pytest.raises(CheckpointError, match="refused: .*nothing in it was run"):
        load_checkpoint(path)
    assert not (tmp_path / "PWNED").exists()


def test_a_failed_checkpoint_write_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "member_0_step_000000004.pt"
    save_checkpoint({"w": torch.ones(3)}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(StorageError, match=r"could not write .*member_0_step_000000004\.pt' \(No space left on "
                       r"device\); its previous version, if any, is intact and no partial file was left"):
        save_checkpoint({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temp file left behind


def _state(step: int) -> TrainState:
    return TrainState(member=1, global_step=step, model={"w": torch.tensor([float(step)])}, optimizer={}, scaler={},
                      scheduler={}, progress={}, order_generator=torch.zeros(1), rng={}, micro_batch_size=4,
                      eval_batch_size=8, oom_recoveries=0, skipped_steps=0)


def test_rotation_keeps_the_newest(tmp_path):
    run = RunFolder.create(tmp_path)
    for step in (3, 10, 7, 12):
        save_step(run, 1, _state(step), keep=2)
    assert [p.name for p in run.step_checkpoints(1)] == ["member_1_step_000000010.pt", "member_1_step_000000012.pt"]
    assert run.latest_step_checkpoint(1).name == "member_1_step_000000012.pt"
    assert run.step_checkpoints(0) == [] and run.latest_step_checkpoint(0) is None


def test_a_step_checkpoint_holds_the_train_states_fields_and_its_format_version(tmp_path):
    """TrainState's fields are the file's keys (nothing else lists them); a file lacking one, or written by a
    newer format, is refused naming the file; a file of before the format version (0) still loads."""
    run = RunFolder.create(tmp_path)
    path = save_step(run, 1, _state(5), keep=2)
    raw = load_checkpoint(path)
    assert set(raw) == set(TrainState.__dataclass_fields__) and raw["format_version"] == FORMAT_VERSION == 1
    assert load_step(path).model["w"].tolist() == [5.0]
    with pytest.raises(CheckpointError, match=r"checkpoint 'x.pt': it lacks order_generator, rng$"):
        TrainState.from_dict({k: v for k, v in raw.items() if k not in ("rng", "order_generator")}, "x.pt")
    with pytest.raises(CheckpointError, match=r"its format version 99 is newer than this version's 1"):
        TrainState.from_dict({**raw, "format_version": 99}, "x.pt")
    older = {k: v for k, v in raw.items() if k not in ("format_version", "world_size", "schedule", "config")}
    assert TrainState.from_dict(older, "x.pt").format_version == 0


# --- the real CLI: kill -9 and SIGTERM, then --resume ------------------------------------------------

CLI_SETTINGS = ["--set", "data.num_symbols=3", "--set", "data.num_bars=1000", "--set", "data.sequence_length=24",
                "--set", "model.d_model=32", "--set", "model.num_transformer_blocks=1", "--set", "model.ff_dim=64",
                "--set", "train.epochs=2", "--set", "train.batch_size=32", "--set", "train.checkpoint_every_steps=5",
                "--set", "train.strong_baseline=false",   # LightGBM has its own tests
                "--set", "run.report=false"]              # and so has report.html


def _start(tmp_path, log_dir):
    import os
    import subprocess
    import sys

    from conftest import REPO
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.Popen([sys.executable, "-m", "enhanced_tft.cli", "train", "--log_dir", str(log_dir),
                             *CLI_SETTINGS], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_checkpoint(log_dir, process, timeout=120.0):
    import time
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = sorted(log_dir.glob("training_*/checkpoints/member_0_step_*.pt"))
        if found:
            return found[0].parents[1]
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def _final(run):
    import json
    return load_checkpoint(run / "checkpoints" / "member_0_best.pt"), json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_kill_9_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    import signal

    from conftest import run_cli
    reference = run_cli(["-m", "enhanced_tft.cli", "train", "--log_dir", str(tmp_path / "ref"), *CLI_SETTINGS],
                        cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    expected_weights, expected = _final(next((tmp_path / "ref").glob("training_*")))

    process = _start(tmp_path, tmp_path / "killed")
    run = _wait_for_checkpoint(tmp_path / "killed", process)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    assert not (run / "summary.json").exists()                     # it really died before finishing

    resumed = run_cli(["-m", "enhanced_tft.cli", "train", "--resume", str(run)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "member 0 resumed from member_0_step_" in resumed.stderr
    weights, summary = _final(run)
    for name, value in expected_weights.items():
        torch.testing.assert_close(weights[name], value, atol=1e-6, rtol=0, msg=name)
    for key, value in expected["test"].items():
        assert summary["test"][key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, inject_faults):
    """A real SIGTERM to this process mid-epoch, through etft's own handlers (kill -9 above runs a process)."""
    import os
    import signal

    from conftest import run_cli
    sent = []

    def sigterm_at_step_7(phase, step, index, indices):
        if (phase, step, index) == ("train", 7, 0) and not sent:
            sent.append(step)
            os.kill(os.getpid(), signal.SIGTERM)
    inject_faults(sigterm_at_step_7)
    stopped = run_cli(["-m", "enhanced_tft.cli", "train", "--log_dir", str(tmp_path / "logs"), *CLI_SETTINGS],
                      cwd=tmp_path)
    (run,) = (tmp_path / "logs").glob("training_*")
    assert stopped.returncode == 143, stopped.stderr
    assert f"Resume with: etft train --resume {run}" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert sorted(p.name for p in (run / "checkpoints").glob("member_0_step_*.pt"))[-1] == "member_0_step_000000008.pt"
    resumed = run_cli(["-m", "enhanced_tft.cli", "train", "--resume", str(run), "--set", "train.epochs=3"],
                      cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    _, summary = _final(run)
    assert summary["status"] == "completed"


@pytest.mark.slow
def test_resume_refuses_a_changed_model_and_a_malicious_checkpoint(tmp_path):
    from conftest import run_cli
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--log_dir", str(tmp_path), *CLI_SETTINGS,
                      "--set", "train.epochs=1"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run = next(tmp_path.glob("training_*"))
    changed = run_cli(["-m", "enhanced_tft.cli", "train", "--resume", str(run), "--set", "model.d_model=64"],
                      cwd=tmp_path)
    assert changed.returncode == 2
    assert "model.d_model: 32 -> 64" in changed.stderr and "allowed changes: train.epochs" in changed.stderr
    for stale in (run / "checkpoints").glob("member_0_*"):
        stale.unlink()
    with open(run / "checkpoints" / "member_0_step_000000099.pt", "wb") as handle:
        pickle.dump({"model": _Exploit()}, handle)
    evil = run_cli(["-m", "enhanced_tft.cli", "train", "--resume", str(run)], cwd=tmp_path)
    assert evil.returncode == 2 and "refused" in evil.stderr and "Traceback" not in evil.stderr
    assert not (tmp_path / "PWNED").exists()
    missing = run_cli(["-m", "enhanced_tft.cli", "train", "--resume", str(tmp_path / "nope")], cwd=tmp_path)
    assert missing.returncode == 2 and "is not a run folder" in missing.stderr


def test_full_disk_and_unusable_log_dir_are_reported_before_training(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from conftest import run_cli
    from enhanced_tft.runs import RunFolder
    from enhanced_tft.training.ensemble import check_free_space

    run = RunFolder.create(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))
    with pytest.raises(ValueError, match=r"only 1 MiB free under .*the checkpoints need about \d+ MiB"):
        check_free_space(run, num_parameters=1_000_000, keep=2)
    monkeypatch.undo()
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--test_mode", "--log_dir", str(blocker / "logs")],
                     cwd=tmp_path)
    assert result.returncode == 2 and "cannot be created" in result.stderr and "Traceback" not in result.stderr


def test_a_member_result_of_an_older_version_is_refused_with_what_to_do(tmp_path):
    from enhanced_tft.training.ensemble import MemberResult
    old = {"summary": {"member": 0}, "prediction": torch.zeros(3)}   # before the interpretation sums were kept
    with pytest.raises(CheckpointError, match=r"older version of Enhanced TFT \(it lacks weights\); delete it"):
        MemberResult.from_dict(old, "member_0_result.pt")
