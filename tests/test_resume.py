"""Never lose a run: exact resume from a mid-epoch checkpoint, NaN guard, safe and atomic checkpoints."""
import io
import pickle

import pytest
import torch

from enhanced_tft.train.checkpoint import CheckpointError, load_checkpoint, save_atomic
from enhanced_tft.train.ensemble import CheckpointRotation
from enhanced_tft.train.resume import NonFiniteGiveUp

from test_trainer import make_trainer


def _snapshot(state: dict) -> dict:
    """A deep copy through serialisation, as a checkpoint file would hold it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
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
    resumed.load_state_dict(mid, best_file)
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
    original = trainer.model.head.loss
    poisoned = {2, 3}

    def loss(output, target):
        values = original(output, target)
        return values * float("nan") if trainer.global_step in poisoned else values
    trainer.model.head.loss = loss
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
    trainer.model.head.loss = original
    trainer.fit()
    assert trainer.progress.nonfinite_in_a_row == 0


def test_nan_every_step_stops_the_run_with_advice(resume_raw):
    resume_raw["train"]["max_nonfinite_steps"] = 3
    trainer, _ = make_trainer(resume_raw)
    original = trainer.model.head.loss
    trainer.model.head.loss = lambda output, target: original(output, target) * float("inf")
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
    save_atomic({"w": torch.ones(3)}, path)

    def broken_save(obj, handle, *args, **kwargs):
        handle.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_atomic({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]   # no temp file left behind


def test_rotation_keeps_the_newest(tmp_path):
    rotation = CheckpointRotation(tmp_path, member=1, keep=2)
    for step in (3, 10, 7, 12):
        rotation.save({"global_step": step, "w": torch.tensor([step])})
    assert [p.name for p in rotation.files()] == ["member_1_step_000000010.pt", "member_1_step_000000012.pt"]
    assert rotation.latest().name == "member_1_step_000000012.pt"
