"""Data-parallel training under real torchrun processes (gloo on the CPU): the mathematics of one process,
one run folder, restarts after a killed worker, and resume across world sizes. The step's agreement on an out-of-memory
of one rank runs in this process with two threads (tests/test_ranks_in_process.py)."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REPO, run_cli
from enhanced_tft.config.schema import load_config
from enhanced_tft.training.plan_report import plan_dims
from enhanced_tft.training.planner import CONTEXT_BYTES, FRAGMENTATION_MARGIN, parse_bytes, trace_step

# dropout 0 and fp32: the same windows must give the same weights, whatever the number of ranks
DDP_YAML = """
seed: 7
data: {num_symbols: 2, num_bars: 700, sequence_length: 16}
model: {d_model: 16, num_heads: 2, num_transformer_blocks: 1, ff_dim: 32, variable_hidden_size: 4, dropout_rate: 0.0}
train: {micro_batch_size: 16, gradient_accumulation_steps: 4, epochs: 2, log_every_steps: 4, checkpoint_every_steps: 5,
        mixed_precision: fp32, early_stopping_patience: 5, strong_baseline: false}
run: {report: false}
"""


def _env() -> dict:
    paths = (str(REPO / "src"), str(REPO / "tests"), os.environ.get("PYTHONPATH"))
    # one thread a rank: two ranks on two cores, as a 1-process run on one thread
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")


def _run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env or _env(), capture_output=True, text=True,
                          timeout=timeout)   # a hang fails the test instead of blocking the suite


def _torchrun(ranks: int, program: list[str], cwd: Path, extra: list[str] = (), env: dict | None = None):
    return _run(["-m", "torch.distributed.run", f"--nproc-per-node={ranks}", "--standalone", *extra, *program],
                cwd, env)


def _one_thread_here(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`etft ARGS` in this process on one thread, as each torchrun rank runs (OMP_NUM_THREADS=1 in _env)."""
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"   # configure_threads follows it
    try:
        return run_cli(["-m", "enhanced_tft", *args], cwd)
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before


def _etft(*args: str) -> list[str]:
    return ["-m", "enhanced_tft", *args]   # __main__.py: what `torchrun -m enhanced_tft train` runs


def _only_run(log_dir: Path) -> Path:
    (run,) = log_dir.glob("training_*")
    return run


def _weights(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "member_0_best.pt", weights_only=True)


def _assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    left, right = _weights(a), _weights(b)
    assert left.keys() == right.keys()
    for name in left:
        torch.testing.assert_close(right[name], left[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory) -> Path:
    """The reference: one process, the same config."""
    folder = tmp_path_factory.mktemp("ddp_single")
    (folder / "ddp.yaml").write_text(DDP_YAML)
    result = _one_thread_here(["train", "--config", "ddp.yaml", "--log_dir", "logs"], folder)
    assert result.returncode == 0, result.stderr
    return _only_run(folder / "logs")


def _epochs(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The same config trained by two torchrun ranks: its run folder and what torchrun printed."""
    folder = tmp_path_factory.mktemp("ddp_two_ranks")
    (folder / "ddp.yaml").write_text(DDP_YAML)
    result = _torchrun(2, _etft("train", "--config", "ddp.yaml", "--log_dir", "logs"), folder)
    assert result.returncode == 0, result.stderr
    return _only_run(folder / "logs"), result


@pytest.mark.slow   # torchrun: processes
def test_two_ranks_train_the_weights_and_metrics_of_one_process(single_run, two_rank_run):
    run, result = two_rank_run                                           # one run folder for both ranks
    assert not list(run.parent.glob(".torchrun_*"))                      # the restart marker is gone when done
    _assert_same_weights(single_run, run)
    one, two = _epochs(single_run), _epochs(run)
    assert [r["epoch"] for r in two] == [1, 2] and len(one) == len(two)
    for a, b in zip(one, two):
        assert b["loss/val"] == pytest.approx(a["loss/val"], abs=1e-6)
        assert b["loss/train"] == pytest.approx(a["loss/train"], abs=1e-6)
        assert b["val/accuracy"] == a["val/accuracy"]
    summary, reference = (json.loads((r / "summary.json").read_text()) for r in (run, single_run))
    assert summary["test"] == reference["test"] and summary["baseline"] == reference["baseline"]
    assert summary["world_size"] == 2 and reference["world_size"] == 1
    rows, reference_rows = (pd.read_csv(r / "predictions_test.csv") for r in (run, single_run))
    assert list(rows.columns) == list(reference_rows.columns) and len(rows) == summary["test"]["num_samples"]
    assert (rows[["symbol", "timestamp", "label"]] == reference_rows[["symbol", "timestamp", "label"]]).all().all()
    assert (rows.p_up - reference_rows.p_up).abs().max() < 1e-5          # gathered in order, each sample once
    log = (run / "training.log").read_text()
    assert "data-parallel training on 2 ranks (gloo)" in log
    assert log.count("member 0 epoch 2/2") == 1                          # rank 0 alone writes the log
    assert "micro-batch 16 x 2" in log                                   # each rank: its 32 of the 64 samples
    assert result.stderr.count("member 0 epoch 2/2") == 1                # and alone prints progress


@pytest.mark.slow   # torchrun: processes
def test_a_killed_worker_is_restarted_and_resumes_the_same_run(single_run, tmp_path):
    (tmp_path / "ddp.yaml").write_text(DDP_YAML)
    env = dict(_env(), ETFT_TEST_FAULT="kill:1:12:0")                    # after the checkpoint of step 10
    result = _torchrun(2, [str(REPO / "tests" / "ddp_entry.py"), "train", "--config", "ddp.yaml",
                           "--log_dir", "logs"], tmp_path, extra=["--max-restarts=1"], env=env)
    assert result.returncode == 0, result.stderr
    run = _only_run(tmp_path / "logs")                                   # the restart continued this folder
    log = (run / "training.log").read_text()
    assert "resuming run folder" in log and "member 0 resumed from member_0_step_000000010.pt" in log
    assert "rank 0: another rank stopped while this one waited on it" in result.stderr   # a peer, not a bug
    assert "this is a bug in Enhanced TFT" not in result.stderr
    _assert_same_weights(single_run, run)


@pytest.mark.slow   # torchrun: processes
def test_a_two_rank_checkpoint_resumes_in_one_process(single_run, two_rank_run, tmp_path):
    """Stopped mid-epoch by 2 ranks, finished by 1 process: the weights of the uninterrupted run."""
    run = tmp_path / "logs" / two_rank_run[0].name
    shutil.copytree(two_rank_run[0], run)   # the two ranks' folder, as if stopped at step 25 of 30
    steps = sorted((run / "checkpoints").glob("member_0_step_*.pt"))
    assert [p.name for p in steps] == ["member_0_step_000000025.pt", "member_0_step_000000030.pt"]
    steps[-1].unlink()                                                    # stopped at step 25 of 30,
    (run / "checkpoints" / "member_0_result.pt").unlink()               # mid-way through epoch 2
    (run / "summary.json").unlink()
    resumed = _one_thread_here(["train", "--resume", str(run)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    log = (run / "training.log").read_text()
    assert "member_0_step_000000025.pt (epoch 2, step 10 of it; written by 2 rank(s), continued by 1)" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["ensemble"]["members"][0]["epochs_run"] == 2
    _assert_same_weights(single_run, run)


@pytest.mark.slow   # torchrun: processes
def test_two_machines_rendezvous_on_localhost_and_train_the_single_process_result(single_run, tmp_path):
    """Two torchrun launches, one a "machine" (--nnodes 2), meeting through a c10d rendezvous on localhost."""
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "ddp.yaml").write_text(DDP_YAML)
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}", "--nproc-per-node=1",
         "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=etft-two-nodes",
         *_etft("train", "--config", "ddp.yaml", "--log_dir", "logs")],
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    try:
        outputs = [launch.communicate(timeout=240) for launch in launches]
    finally:
        for launch in launches:
            launch.kill()
    assert [launch.returncode for launch in launches] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    run = _only_run(tmp_path / "logs")
    assert "data-parallel training on 2 ranks (gloo)" in (run / "training.log").read_text()
    _assert_same_weights(single_run, run)


MEMBERS = ["--set", "train.ensemble_size=3", "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=6"]


@pytest.mark.slow   # torchrun: processes
def test_members_spread_over_ranks_are_the_members_of_the_serial_run(tmp_path):
    (tmp_path / "ddp.yaml").write_text(DDP_YAML)
    serial = _one_thread_here(["train", "--config", "ddp.yaml", "--log_dir", "serial", *MEMBERS], tmp_path)
    assert serial.returncode == 0, serial.stderr
    spread = _torchrun(2, _etft("train", "--config", "ddp.yaml", "--log_dir", "spread", *MEMBERS,
                                "--set", "train.distribute=members"), tmp_path)
    assert spread.returncode == 0, spread.stderr
    one, two = _only_run(tmp_path / "serial"), _only_run(tmp_path / "spread")
    a, b = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert [m["member"] for m in b["ensemble"]["members"]] == [0, 1, 2]
    assert [m["test"] for m in b["ensemble"]["members"]] == [m["test"] for m in a["ensemble"]["members"]]
    assert b["test"] == a["test"] and b["ensemble"]["mean_member"] == a["ensemble"]["mean_member"]
    for member in range(3):
        left = torch.load(one / "checkpoints" / f"member_{member}_best.pt", weights_only=True)
        right = torch.load(two / "checkpoints" / f"member_{member}_best.pt", weights_only=True)
        assert all(torch.equal(left[k], right[k]) for k in left), member   # one process each: to the bit
    log = (two / "training.log").read_text()
    assert "[rank 1] member 1 epoch 1/1" in log and "member 2 epoch 1/1" in log   # rank 0 trained 0 and 2


@functools.cache
def _needed_bytes(config: Path, micro: int) -> float:
    """The traced step at `micro` with the plan's context and fragmentation margins (bf16: seed_original's
    mixed_precision true, on a GPU)."""
    cfg = load_config(config)
    return CONTEXT_BYTES + (1 + FRAGMENTATION_MARGIN) * trace_step(cfg, plan_dims(cfg), micro, "bf16", "none").peak_bytes


def _assert_largest_that_fits(config: Path, max_micro: int, budget: int) -> None:
    """The step at `max_micro` fits `budget`, one more sample does not: what the plan promises, on whatever CPU
    computes it."""
    assert _needed_bytes(config, max_micro) <= budget < _needed_bytes(config, max_micro + 1), max_micro


@pytest.mark.slow   # traces of the full-size seed model
@pytest.mark.parametrize("devices, micro, steps", [(2, 32, 2), (3, 32, 2), (8, 16, 1)])
def test_plan_fits_each_devices_share_of_the_effective_batch(devices, micro, steps, tmp_path):
    """seed_original (effective batch 128) where about 50 samples fit one device (32 to 63 give these sizes):
    each device runs ceil(128 / N)."""
    import contextlib
    import io

    from enhanced_tft.cli import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--config", str(REPO / "configs" / "seed_original.yaml"), "--gpu-memory", "1.2GiB",
                     "--nproc-per-node", str(devices), "--json"]) == 0
    result = json.loads(out.getvalue())
    assert result["num_devices"] == devices
    _assert_largest_that_fits(REPO / "configs" / "seed_original.yaml", result["max_micro_batch"], parse_bytes("1.2GiB"))
    assert (result["micro_batch_size"], result["gradient_accumulation_steps"]) == (micro, steps)
    assert 128 % result["micro_batch_size"] == 0                          # batch_size x accumulation = 128
    assert micro * steps * devices >= 128 > micro * (steps - 1) * devices  # the shares cover the batch once


@pytest.mark.slow   # torchrun: processes
def test_sigterm_to_the_launcher_checkpoints_every_rank_once_and_the_run_resumes(tmp_path):
    """torchrun passes SIGTERM to its workers; they agree at the next window, rank 0 writes one checkpoint."""
    import signal
    import time
    (tmp_path / "ddp.yaml").write_text(DDP_YAML.replace("epochs: 2", "epochs: 30").replace(
        "checkpoint_every_steps: 5", "checkpoint_every_steps: 1000"))
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone",
                                 *_etft("train", "--config", "ddp.yaml", "--log_dir", "logs")],
                                cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("logs/training_*/checkpoints/member_0_step_*.pt")):   # the first epoch's end
        assert launcher.poll() is None and time.time() < deadline, launcher.communicate()
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=120)
    run = _only_run(tmp_path / "logs")
    assert "Resume with: etft train --resume" in stderr and stderr.count("Resume with:") == 1   # rank 0 says it
    checkpoints = sorted((run / "checkpoints").glob("member_0_step_*.pt"))
    assert 1 <= len(checkpoints) <= 2                                     # the epoch's and the stop's, nothing else
    stopped_at = torch.load(checkpoints[-1], weights_only=True)
    assert stopped_at["world_size"] == 2 and not (run / "summary.json").exists()
    resumed = _one_thread_here(["train", "--resume", str(run), "--set", "train.epochs=2"], tmp_path)   # one rank now
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow   # torchrun: processes
def test_bad_input_under_restarts_stays_bad_input_and_leaves_nothing(tmp_path):
    (tmp_path / "ddp.yaml").write_text(DDP_YAML)
    result = _torchrun(1, _etft("train", "--config", "ddp.yaml", "--log_dir", "logs", "--data", "missing.csv"),
                       tmp_path, extra=["--max-restarts=1"])   # one rank is enough: each attempt fails alike
    assert result.returncode != 0
    assert result.stderr.count("etft train: error: data file") >= 2          # both attempts: the same message
    assert "does not exist (data.path)" in result.stderr and "this is a bug" not in result.stderr
    assert not list((tmp_path / "logs").glob("training_*")) and not list((tmp_path / "logs").glob(".torchrun_*"))
