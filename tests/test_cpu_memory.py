"""Running out of memory on the CPU: the allocator's failure is recovered like a CUDA OOM (halve the micro-batch, keep
the effective batch, give up at one sample), a warning comes first when the memory plan says a step will not fit what
the process may allocate, and the budget fit finds its divisor without counting to the effective batch."""
import json
import os
import resource
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_memory import _oom_raw
from test_trainer import make_trainer

from conftest import REPO
from enhanced_tft.errors import OutOfMemoryGiveUp
from enhanced_tft.model.build import dims_for
from enhanced_tft.runtime import memory
from enhanced_tft.runtime.memory import AvailableMemory, is_out_of_memory
from enhanced_tft.training import planner

MIB = 2**20


def real_cpu_allocator_error() -> RuntimeError:
    """The error torch's CPU allocator raises, made for real: 4 EiB is more than any address space."""
    try:
        torch.empty(2**62, dtype=torch.uint8)
    except RuntimeError as err:
        return err
    pytest.fail("allocating 4 EiB succeeded")


SHAPE_ERROR = "mat1 and mat2 shapes cannot be multiplied (2x3 and 2x3)"


class InjectError:
    """Raise the given exception at chosen (phase, step, micro_index) points, once each."""

    def __init__(self, points: dict):
        self.points = dict(points)
        self.fired = []

    def __call__(self, phase, step, index, indices):
        error = self.points.pop((phase, step, index), None)
        if error is not None:
            self.fired.append((phase, step, index, indices.numel()))
            raise error


# --- what counts as running out of memory ------------------------------------------------------------

def test_the_cpu_allocators_real_failure_and_numpys_count_as_out_of_memory():
    err = real_cpu_allocator_error()
    assert type(err) is RuntimeError and not isinstance(err, torch.OutOfMemoryError)
    assert "DefaultCPUAllocator: can't allocate memory: you tried to allocate 4611686018427387904 bytes" in str(err)
    assert is_out_of_memory(err)
    with pytest.raises(MemoryError) as numpy_err:
        np.empty(2**62, dtype=np.uint8)
    assert is_out_of_memory(numpy_err.value)
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    windows = ("[enforce fail at C:\\actions-runner\\c10\\core\\impl\\alloc_cpu.cpp:72] data. DefaultCPUAllocator: "
               "not enough memory: you tried to allocate 1073741824 bytes.")
    assert is_out_of_memory(RuntimeError(windows))


def test_other_errors_are_not_out_of_memory(monkeypatch):
    with pytest.raises(RuntimeError) as shape_err:
        torch.ones(2, 3) @ torch.ones(2, 3)
    assert not is_out_of_memory(shape_err.value)
    assert not is_out_of_memory(ValueError("not enough values to unpack"))
    assert not is_out_of_memory(KeyError("observed"))
    # oneDNN: a refused configuration is never memory; a failed primitive is, only while memory is nearly gone
    descriptor = RuntimeError("could not create a primitive descriptor for a matmul primitive")
    primitive = RuntimeError("could not create a primitive")
    monkeypatch.setattr(memory, "available_process_memory_bytes", lambda: AvailableMemory(8 * 2**30, "test"))
    assert not is_out_of_memory(descriptor) and not is_out_of_memory(primitive)
    monkeypatch.setattr(memory, "available_process_memory_bytes", lambda: AvailableMemory(40 * MIB, "test"))
    assert not is_out_of_memory(descriptor) and is_out_of_memory(primitive)


# --- recovery in the trainer -------------------------------------------------------------------------

def test_cpu_allocator_failure_halves_the_micro_batch_and_keeps_every_step_exact(small_raw, caplog, inject_faults):
    raw = _oom_raw(small_raw)   # micro-batch 16 x 2 = effective batch 32, 6 steps, fp32, dropout 0
    reference, data = make_trainer(raw)
    reference.fit()
    hook = InjectError({("train", 1, 0): real_cpu_allocator_error(), ("train", 3, 1): MemoryError("numpy")})
    trainer, _ = make_trainer(raw, data)
    inject_faults(hook)
    with caplog.at_level("WARNING"):
        result = trainer.fit()
    assert [f[:3] for f in hook.fired] == [("train", 1, 0), ("train", 3, 1)]
    assert result.oom_recoveries == 2 and result.micro_batch_size == 4 and result.optimizer_steps == 6
    assert trainer.accumulation_steps == 8 and trainer.effective_batch_size == 32
    assert "out of memory in train step 1: micro-batch 16 -> 8, accumulation steps -> 4, effective batch 32 kept" \
        in caplog.text
    assert "out of memory in train step 3: micro-batch 8 -> 4, accumulation steps -> 8" in caplog.text
    # the same windows in smaller pieces: the same weights as the run that never failed (fp32, dropout 0)
    for (name, a), b in zip(reference.model.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


def test_cpu_allocator_failure_in_evaluation_halves_the_chunk(small_raw, caplog, inject_faults):
    raw = _oom_raw(small_raw)
    reference, data = make_trainer(raw)
    expected = reference.evaluate("val")
    trainer, _ = make_trainer(raw, data)
    inject_faults(InjectError({("val", 0, 1): real_cpu_allocator_error()}))
    with caplog.at_level("WARNING"):
        got = trainer.evaluate("val")
    assert trainer.eval_batch_size == 16 and trainer.micro_batch_size == 16 and trainer.oom_recoveries == 1
    torch.testing.assert_close(got.prediction, expected.prediction)
    assert got.loss == pytest.approx(expected.loss, rel=1e-6)
    assert "out of memory in val: evaluation chunk 32 -> 16; redoing the chunk" in caplog.text


def test_cpu_allocator_failure_at_micro_batch_one_gives_up_with_the_advice(small_raw, inject_faults):
    raw = _oom_raw(small_raw)
    raw["train"].update(micro_batch_size=2, gradient_accumulation_steps=1)
    trainer, _ = make_trainer(raw)
    error = real_cpu_allocator_error()

    def always(phase, step, index, indices):
        raise error
    inject_faults(always)
    with pytest.raises(OutOfMemoryGiveUp) as err:
        trainer.fit()
    assert trainer.oom_recoveries == 1 and trainer.micro_batch_size == 1   # 2 -> 1, then 1 failed too
    message = str(err.value)
    assert message.startswith("out of memory in train even at micro-batch 1 (d_model 16, ff_dim 32, 1 blocks, "
                              "sequence_length 16, precision auto")
    for key in ("train.activation_checkpointing=all", "data.sequence_length", "model.d_model", "etft plan"):
        assert key in message


def test_other_runtime_errors_propagate_unchanged(small_raw, inject_faults):
    raw = _oom_raw(small_raw)
    trainer, data = make_trainer(raw)
    for phase, run in (("train", lambda: trainer.train_window(data.splits["train"], torch.arange(32))),
                       ("val", lambda: trainer.evaluate("val"))):
        error = RuntimeError(SHAPE_ERROR)
        inject_faults(InjectError({(phase, 0, 0): error}))
        with pytest.raises(RuntimeError) as raised:
            run()
        assert raised.value is error
    assert trainer.oom_recoveries == 0 and trainer.micro_batch_size == 16 and trainer.eval_batch_size == 32


def test_inference_outside_training_halves_its_batch_on_the_cpu_allocators_failure(small_raw, caplog, inject_faults):
    """`etft predict` and `evaluate` run infer() with its own back-off (runtime.memory.OomBackoff)."""
    from enhanced_tft.serving.inference import infer
    trainer, data = make_trainer(_oom_raw(small_raw))
    args = ([trainer.model], trainer.task, data.splits["val"], trainer.device, trainer.policy, 32)
    expected = torch.cat([chunk.predictions[0] for chunk in infer(*args)])
    hook = InjectError({("inference", 0, 1): real_cpu_allocator_error()})
    with caplog.at_level("WARNING"):
        inject_faults(hook)
        chunks = list(infer(*args))
    assert [chunk.indices.numel() for chunk in chunks[:4]] == [32, 16, 16, 16]
    torch.testing.assert_close(torch.cat([chunk.predictions[0] for chunk in chunks]), expected)
    assert "out of memory in inference: batch 32 -> 16; redoing the batch" in caplog.text


def test_allocator_failure_in_the_optimizer_step_stops_cleanly(small_raw, monkeypatch):
    trainer, data = make_trainer(_oom_raw(small_raw))
    trainer.train_window(data.splits["train"], torch.arange(32))
    error = real_cpu_allocator_error()

    def failing_step(*args, **kwargs):
        raise error
    monkeypatch.setattr(trainer.optimizer, "step", failing_step)
    with pytest.raises(OutOfMemoryGiveUp, match="out of memory in the optimizer step .*`etft plan`"):
        trainer.optimizer_step()
    other = RuntimeError(SHAPE_ERROR)
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (_ for _ in ()).throw(other))
    trainer.train_window(data.splits["train"], torch.arange(32))
    with pytest.raises(RuntimeError) as raised:
        trainer.optimizer_step()
    assert raised.value is other


# --- what the process may still allocate ---------------------------------------------------------------

def test_an_address_space_ulimit_is_the_limit_it_reports():
    with open("/proc/self/statm") as handle:
        mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + 256 * MIB, hard))   # the soft limit only: raised again below
    try:
        available = memory.available_process_memory_bytes()
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert available.source == "RLIMIT_AS ulimit minus the process's mapped memory"
    assert 192 * MIB < available.bytes <= 256 * MIB


def test_a_cgroup_limit_is_the_limit_it_reports(tmp_path, monkeypatch):
    """A cgroup v2 limit at the root of the (here faked) hierarchy, as a container sees its own; v1's "no limit"
    (2**63 - 4096) and v2's "max" never count."""
    (tmp_path / "memory.max").write_text(f"{600 * MIB}\n")
    (tmp_path / "memory.current").write_text(f"{400 * MIB}\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (tmp_path / "memory" / "memory.usage_in_bytes").write_text(f"{400 * MIB}\n")
    monkeypatch.setattr(memory, "CGROUP_ROOT", tmp_path)
    available = memory.available_process_memory_bytes()
    assert available == AvailableMemory(200 * MIB, f"cgroup {tmp_path / 'memory.max'} minus usage")
    (tmp_path / "memory.max").write_text("max\n")
    assert memory.available_process_memory_bytes().bytes > 200 * MIB


# --- the warning before training on the CPU --------------------------------------------------------------

def _tiny_run(small_raw):
    small_raw["train"].update(epochs=1, max_steps_per_epoch=1)
    return make_trainer(small_raw)


def test_a_step_larger_than_the_available_memory_is_announced(small_raw, monkeypatch, caplog):
    monkeypatch.setattr(planner, "_PLANNED_PEAKS", {})
    monkeypatch.setattr(planner, "available_process_memory_bytes",
                        lambda: AvailableMemory(1 * MIB, "RLIMIT_AS ulimit minus the process's mapped memory"))
    trainer, data = _tiny_run(small_raw)
    peak = planner.trace_step(trainer.cfg, dims_for(data.transform), 32, "fp32", "none").peak_bytes
    assert peak > 2 * MIB
    rng = torch.get_rng_state()
    with caplog.at_level("WARNING"):
        result = trainer.fit()
    assert result.optimizer_steps == 1
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("memory plan")]
    assert warnings == [
        f"memory plan: one training step at micro-batch 32 (fp32, activation checkpointing none) peaks at "
        f"{peak / 2**30:.2f} GiB, more than the 0.00 GiB this process may still allocate (RLIMIT_AS ulimit minus the "
        "process's mapped memory). If the allocator fails, training halves the micro-batch (effective batch kept); "
        "`etft train --auto_batch` or `etft plan` sizes it to fit"]
    # the trace seeds torch's generator; the run's own stream must not notice
    planner._PLANNED_PEAKS.clear()
    torch.set_rng_state(rng)
    assert planner.warn_if_step_exceeds_memory(trainer.cfg, dims_for(data.transform), 32, "fp32")
    assert torch.equal(torch.get_rng_state(), rng)


def test_no_warning_when_the_step_fits_and_none_when_the_plan_fails(small_raw, monkeypatch, caplog):
    monkeypatch.setattr(planner, "_PLANNED_PEAKS", {})
    trainer, data = _tiny_run(small_raw)
    dims = dims_for(data.transform)
    peak = planner.trace_step(trainer.cfg, dims, 32, "fp32", "none").peak_bytes
    monkeypatch.setattr(planner, "available_process_memory_bytes", lambda: AvailableMemory(peak, "test"))
    with caplog.at_level("WARNING"):
        assert not planner.warn_if_step_exceeds_memory(trainer.cfg, dims, 32, "fp32")
    monkeypatch.setattr(planner, "_PLANNED_PEAKS", {})
    monkeypatch.setattr(planner, "available_process_memory_bytes", lambda: AvailableMemory(0, "test"))

    def broken(*args, **kwargs):
        raise NotImplementedError("an op fake tensors cannot run")
    monkeypatch.setattr(planner, "trace_step", broken)
    with caplog.at_level("DEBUG", logger="enhanced_tft.training.planner"):
        result = trainer.fit()
    assert result.optimizer_steps == 1
    assert "no memory plan before training on the CPU" in caplog.text and "an op fake tensors cannot run" in caplog.text
    assert "memory plan: one training step" not in caplog.text


# --- a real address-space limit, through the command line -----------------------------------------------

# Torch, pandas and BLAS map about 2 GiB of address space before training starts here (783 MiB after the imports,
# 2.0 GiB after building the data), and how much depends on the machine: a limit set when the process starts cannot
# tell "the step at 1024 samples fails" from "start-up fails". So the CLI's own main() runs under a limit of the
# mapped memory + HEADROOM set when Trainer.fit starts, and lifted (the soft limit only) when it returns.
LIMITED_FIT = """
import os, resource, sys
import torchmetrics.functional.classification   # the metrics' lazy import maps matplotlib: not under the limit
from enhanced_tft.cli import main
from enhanced_tft.training import trainer

headroom, fit = int(sys.argv[1]), trainer.Trainer.fit

def limited_fit(self):
    with open("/proc/self/statm") as handle:
        mapped = int(handle.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + headroom, hard))
    try:
        return fit(self)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

trainer.Trainer.fit = limited_fit
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc/self/statm are Linux's")
def test_a_real_address_space_limit_is_survived_by_halving(tmp_path):
    """Sequence length 96: a step needs about 0.93 MiB a sample (the plan), so 1024 samples cannot run in 600 MiB
    and 512 can; the allocator's real failure halves the micro-batch and the run finishes."""
    (tmp_path / "limited_fit.py").write_text(LIMITED_FIT)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run(
        [sys.executable, "limited_fit.py", str(600 * MIB), "train", "--test_mode", "--log_dir", "logs",
         "--set", "data.sequence_length=96", "--set", "train.batch_size=1024", "--set", "train.epochs=1",
         "--set", "train.max_steps_per_epoch=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "logs").glob("training_*")
    log = (run / "training.log").read_text()
    assert "memory plan: one training step at micro-batch 1024 (fp32, activation checkpointing none) peaks at " in log
    assert "this process may still allocate (RLIMIT_AS ulimit minus the process's mapped memory)" in log
    assert ("out of memory in train step 0: micro-batch 1024 -> 512, accumulation steps -> 2, effective batch 1024 "
            "kept") in log
    (member,) = json.loads((run / "summary.json").read_text())["ensemble"]["members"]
    assert member["oom_recoveries"] >= 1 and member["micro_batch_size"] <= 512 and member["optimizer_steps"] == 1


# --- the budget fit's divisor --------------------------------------------------------------------------

def _old_divisor(effective: int, limit: int) -> int:
    """fit_budget's former search: every candidate from 1 to the limit."""
    return max((d for d in range(1, limit + 1) if effective % d == 0), default=0)


@pytest.fixture
def linear_plan(monkeypatch):
    """fit_budget with a stub trace of exactly 1 byte a sample and no margins: the largest micro-batch that fits is
    the budget itself."""
    monkeypatch.setattr(planner, "trace_step", lambda cfg, dims, micro, precision, checkpointing:
                        SimpleNamespace(peak_bytes=micro))
    monkeypatch.setattr(planner, "CONTEXT_BYTES", 0)
    monkeypatch.setattr(planner, "FRAGMENTATION_MARGIN", 0.0)

    def fit(effective, budget, num_devices=1):
        cfg = SimpleNamespace(train=SimpleNamespace(samples_per_step=effective))
        return planner.fit_budget(cfg, None, budget, "fp32", "none", probe=4, num_devices=num_devices)
    return fit


def test_the_divisor_search_matches_the_old_loop(linear_plan):
    for effective in range(1, 400):
        for budget in {0, 1, 2, 3, effective // 3, effective // 2, effective - 1, effective, effective + 5}:
            for num_devices in (1, 3):
                fit = linear_plan(effective, budget, num_devices)
                share = -(-effective // num_devices)
                assert fit.max_micro_batch == max(budget, 0)
                assert fit.micro_batch_size == _old_divisor(effective, min(budget, share)), (effective, budget)
                micro = fit.micro_batch_size
                assert fit.gradient_accumulation_steps == (-(-share // micro) if micro else 0)


@pytest.mark.parametrize("effective, budget, expected", [
    (2**24, 2**24, 2**24), (2**24, 3 * 2**20, 2**21), (2**24 - 3, 2**20, 1),   # 2**24 - 3 is prime
    (720_720, 1000, 990), (720_720 * 23, 500_000, 473_616), (99_991 * 2, 99_990, 2)])
def test_large_effective_batches(linear_plan, effective, budget, expected):
    """Up to the config's bound of 2**24; the old loop checks every case it can count through in a second."""
    assert linear_plan(effective, budget).micro_batch_size == expected
    if budget <= 2**21:
        assert _old_divisor(effective, budget) == expected


@pytest.mark.parametrize("config, micro, features", [(None, 1, 13), (None, 64, 13), (None, 512, 200),
                                                     ("seed_original.yaml", 16, 13), ("seed_original.yaml", 1024, 64)])
def test_four_times_the_rough_estimate_covers_the_plan(config, micro, features):
    """The quick screen before the warning's trace: skipping the trace must never hide a step that does not fit."""
    from enhanced_tft.config.schema import load_config
    from enhanced_tft.model.tft import ModelDims
    cfg = load_config(REPO / "configs" / config if config else None)
    dims = ModelDims(features, 4, 5, cfg.data.horizon)
    planned = planner.trace_step(cfg, dims, micro, "fp32", "none").peak_bytes
    assert planned <= 4 * planner.rough_step_bytes(cfg, dims, micro) <= max(40 * planned, 2**31)   # not wildly above
