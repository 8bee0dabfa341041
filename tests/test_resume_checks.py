"""Resume and predict verify what they are given: the data's fingerprint, scaler.json, the checkpoints'
shapes and keys, before anything in the run folder is rewritten; a full disk ends with a clear message
and leaves the previous files intact; two resumes of one run never train at once."""
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_cli
from enhanced_tft.cli import main
from enhanced_tft.data.synthetic import generate_bars
from enhanced_tft.errors import UserError
from enhanced_tft.runs import load_checkpoint, save_checkpoint
from enhanced_tft.serving.saved_run import SavedRun

pytestmark = [pytest.mark.cli, pytest.mark.slow]

SETTINGS = ["--set", "seed=7", "--set", "data.sequence_length=16", "--set", "model.d_model=16",
            "--set", "model.num_heads=2", "--set", "model.num_transformer_blocks=1", "--set", "model.ff_dim=32",
            "--set", "model.variable_hidden_size=4", "--set", "train.batch_size=32", "--set", "train.epochs=1",
            "--set", "train.max_steps_per_epoch=6", "--set", "train.checkpoint_every_steps=3",
            "--set", "train.strong_baseline=false",   # LightGBM has its own tests
            "--set", "run.report=false"]              # and so has report.html


def _digests(run: Path) -> dict[str, str]:
    """Content hashes of the files a resume must not rewrite before its checks pass."""
    return {name: hashlib.sha256((run / name).read_bytes()).hexdigest()
            for name in ("config.yaml", "scaler.json", "data.json", "summary.json")}


@pytest.fixture(scope="module")
def file_run(tmp_path_factory) -> Path:
    """A small finished run trained on a CSV file through the real CLI."""
    folder = tmp_path_factory.mktemp("file_run")
    generate_bars(2, 700, seed=5).to_csv(folder / "bars.csv", index=False)
    result = run_cli(["-m", "enhanced_tft", "train", "--data", str(folder / "bars.csv"), "--log_dir",
                      str(folder / "logs"), *SETTINGS], cwd=folder)
    assert result.returncode == 0, result.stderr
    (run,) = (folder / "logs").glob("training_*")
    return run


@pytest.fixture
def run_copy(file_run, tmp_path) -> Path:
    """A copy of the run and of its data file; config.yaml points at the copy's file."""
    copy = tmp_path / "run"
    shutil.copytree(file_run, copy)
    data = tmp_path / "bars.csv"
    shutil.copy2(file_run.parents[1] / "bars.csv", data)
    config = (copy / "config.yaml").read_text().replace(str(file_run.parents[1] / "bars.csv"), str(data))
    (copy / "config.yaml").write_text(config)
    fingerprint = json.loads((copy / "data.json").read_text())
    (copy / "data.json").write_text(json.dumps({**fingerprint, "path": str(data)}))
    return copy


def test_the_fingerprint_records_the_file(file_run):
    saved = json.loads((file_run / "data.json").read_text())
    data = file_run.parents[1] / "bars.csv"
    assert saved["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert saved["size"] == data.stat().st_size and saved["source"] == "file"


def test_a_changed_data_file_is_refused_on_resume_and_nothing_rewritten(run_copy, tmp_path, capsys):
    data = tmp_path / "bars.csv"
    lines = data.read_text().splitlines()
    row = lines[-1].split(",")
    row[5] = f"{float(row[5]) * 1.01:.6f}"   # one close of the test period, 1% higher
    data.write_text("\n".join(lines[:-1] + [",".join(row)]) + "\n")
    before = _digests(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert "the data changed since the run started" in err and "contents differ (SHA-256" in err
    assert "add --allow-changed-data" in err
    assert _digests(run_copy) == before
    # the user says go on: the change lies after the train split, so the fitted scaling still matches
    assert main(["train", "--resume", str(run_copy), "--allow-changed-data"]) == 0
    assert json.loads((run_copy / "summary.json").read_text())["status"] == "completed"


def test_a_change_that_moves_the_scaling_is_refused_even_when_allowed(run_copy, tmp_path, capsys):
    data = tmp_path / "bars.csv"
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[:-300]) + "\n")   # 300 bars fewer: every split boundary moves
    before = _digests(run_copy)
    assert main(["train", "--resume", str(run_copy), "--allow-changed-data"]) == 2
    err = capsys.readouterr().err
    assert "the data no longer gives the scaling the run was trained with (mean:" in err
    assert _digests(run_copy) == before


def test_a_touched_but_equal_file_resumes(run_copy, tmp_path, caplog):
    data = tmp_path / "bars.csv"
    os.utime(data, (time.time() + 100, time.time() + 100))
    assert main(["train", "--resume", str(run_copy)]) == 0
    assert "the data file was modified" in caplog.text and "contents are those the run started with" in caplog.text


def test_a_checkpoint_of_another_model_size_is_refused_before_anything_is_rewritten(run_copy, capsys):
    (result,) = (run_copy / "checkpoints").glob("member_0_result.pt")
    result.unlink()                                    # unfinished: the resume will load the step checkpoint
    step = sorted((run_copy / "checkpoints").glob("member_0_step_*.pt"))[-1]
    state = load_checkpoint(step)
    state["model"] = {k: torch.zeros(*(s + 1 for s in v.shape)) for k, v in state["model"].items()}
    save_checkpoint(state, step)
    before = _digests(run_copy)
    assert main(["train", "--resume", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {str(step)!r} cannot be resumed with this run's config.yaml (shapes differ:" in err
    assert "nothing was changed in the run folder" in err and "Traceback" not in err
    assert _digests(run_copy) == before

    del state["order_generator"], state["rng"]       # a checkpoint of another version: keys missing
    save_checkpoint(state, step)
    assert main(["train", "--resume", str(run_copy)]) == 2
    assert "(it lacks order_generator, rng)" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(std=[0.0] + s["std"][1:]), "std must be finite and > 0 (a zero std divides by zero)"),
    (lambda s: s.update(sequence_length="16"), "sequence_length='16' must be an integer in [2, 100000]"),
    (lambda s: s.update(horizon=10**12), "horizon=1000000000000 must be an integer in [1, 100000]"),
    (lambda s: s.update(symbols=s["symbols"][::-1]), "was changed after training"),
    (lambda s: s.update(task="regression"), "does not belong to the run's config.yaml (task 'regression' here, "
                                            "'classification_binary' in config.yaml)"),
    (lambda s: s.pop("target_std"), "missing target_std"),
])
def test_a_hand_edited_scaler_json_is_refused_by_predict(file_run, tmp_path, capsys, edit, message):
    run = tmp_path / "run"
    shutil.copytree(file_run, run, ignore=shutil.ignore_patterns("checkpoints", "*.csv", "report.html"))
    scaler = json.loads((run / "scaler.json").read_text())
    edit(scaler)
    (run / "scaler.json").write_text(json.dumps(scaler))
    with pytest.raises(UserError) as refused:   # what `etft predict` and `evaluate` open first
        SavedRun.open(run)
    assert message in str(refused.value)


def test_predict_refuses_an_edited_scaler_json_with_exit_2_and_writes_nothing(file_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(file_run, run)
    scaler = json.loads((run / "scaler.json").read_text())
    (run / "scaler.json").write_text(json.dumps({**scaler, "std": [0.0] + scaler["std"][1:]}))
    assert main(["predict", "--run", str(run), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "std must be finite and > 0" in err and "Traceback" not in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_of_the_runs_own_changed_data_is_refused_unless_allowed(run_copy, tmp_path, capsys):
    data = tmp_path / "bars.csv"
    data.write_text(data.read_text().replace("\n", "\r\n"))   # the same bars, other bytes
    out = tmp_path / "p.csv"
    assert main(["predict", "--run", str(run_copy), "--out", str(out)]) == 2
    assert "the run's data changed since training" in capsys.readouterr().err and not out.exists()
    assert main(["predict", "--run", str(run_copy), "--out", str(out), "--allow-changed-data"]) == 0
    assert len(out.read_text().splitlines()) > 10


def _limited(args: list[str], cwd: Path, max_file_bytes: int):
    """The real CLI under a file-size limit: a write past it fails with EFBIG ('File too large'), as a full
    disk fails with ENOSPC; the signal that would kill the process is ignored, as a daemon would."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes})); "
            "from enhanced_tft.cli import main; sys.exit(main(sys.argv[1:]))")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_full_disk_in_predict_keeps_the_previous_file_and_leaves_no_partial_one(file_run, tmp_path):
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    assert main(["predict", "--run", str(file_run), "--out", str(out)]) == 0
    good = out.read_bytes()
    assert len(good) > 4000
    result = _limited(["predict", "--run", str(file_run), "--out", str(out), "--overwrite"], tmp_path, 4000)
    assert result.returncode == 2, result.stderr
    assert f"could not write {str(out)!r} (File too large); its previous version, if any, is intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert out.read_bytes() == good and os.listdir(out.parent) == ["p.csv"]


def test_a_full_disk_while_training_stops_with_how_to_resume_and_the_resume_finishes(tmp_path):
    # the logs and small JSON files fit under 60 kB; a checkpoint of this model does not
    result = _limited(["train", "--log_dir", str(tmp_path / "logs"), "--set", "data.num_symbols=2",
                       "--set", "data.num_bars=700", *SETTINGS], tmp_path, 60_000)
    assert result.returncode == 2, result.stderr
    # the kernel gives a short write, then EFBIG; torch's zip writer notices the short write first
    assert re.search(r"could not write '.*member_0_(best|step_\d+)\.pt' \((File too large|the write stopped short: "
                     r"disk full, quota or file-size limit)\); its previous version, if any, is intact", result.stderr)
    assert "Traceback" not in result.stderr
    (run,) = (tmp_path / "logs").glob("training_*")
    assert f"the run's last checkpoint is intact: etft train --resume {run}" in result.stderr
    assert not [p for p in run.rglob(".tmp.*")]
    resumed = run_cli(["-m", "enhanced_tft", "train", "--resume", str(run)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


def test_two_concurrent_resumes_one_refused_the_other_finishes(file_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(file_run, run)
    for result in (run / "checkpoints").glob("member_0_result.pt"):
        result.unlink()   # unfinished again: the resume trains
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    first = subprocess.Popen([sys.executable, "-m", "enhanced_tft", "train", "--resume", str(run), "--set",
                              "train.epochs=40", "--set", "train.early_stopping_patience=40"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while (run / ".lock").read_text().strip() != str(first.pid):   # it holds the folder
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.05)
    second = run_cli(["-m", "enhanced_tft", "train", "--resume", str(run)], cwd=tmp_path)
    _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2
    assert f"is in use by process {first.pid} (another etft train or --resume of this run)" in second.stderr
    assert first.returncode == 0, first_err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["ensemble"]["members"][0]["epochs_run"] > 1
    for checkpoint in (run / "checkpoints").glob("*.pt"):
        state = load_checkpoint(checkpoint)
        assert isinstance(state, dict) and state
    weights = load_checkpoint(run / "checkpoints" / "member_0_best.pt")
    assert all(np.isfinite(v.float().numpy()).all() for v in weights.values())
