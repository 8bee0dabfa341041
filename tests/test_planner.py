"""The pre-flight memory plan: traced on fake tensors, checked against a real step, and its CLI."""
import json

import pytest
import torch

from conftest import REPO, run_cli
from enhanced_tft import tasks
from enhanced_tft.config.schema import build_config
from enhanced_tft.model.build import build_model
from enhanced_tft.training.plan_report import plan_dims
from enhanced_tft.training.planner import fit_budget, parse_bytes, trace_step


@pytest.fixture
def plan_cfg(small_raw):
    small_raw["model"].update(d_model=32, num_transformer_blocks=2, ff_dim=64)
    return build_config(small_raw)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_plan_agrees_with_a_real_step_measured_by_pytorch(small_raw, dropout):
    """Within 5%: the real step runs under torch's own MemTracker, an instrument independent of the planner,
    with the CPU fast paths off as in the plan (dropout 0.1: both hold torch's dropout masks)."""
    import sys
    sys.path.insert(0, str(REPO / "benchmarks"))
    from plan_vs_measured import measure
    small_raw["model"].update(d_model=32, num_transformer_blocks=2, ff_dim=64, dropout_rate=dropout)
    cfg = build_config(small_raw)
    dims = plan_dims(cfg)
    for precision, checkpointing in [("fp32", "none"), ("bf16", "none"), ("fp32", "blocks")]:
        planned = trace_step(cfg, dims, 32, precision, checkpointing).peak_bytes
        measured = measure(cfg, dims, 32, precision, checkpointing)
        assert planned == pytest.approx(measured, rel=0.05), (precision, checkpointing)


def test_the_plan_traces_the_gpu_step_with_the_fast_paths_off(small_raw):
    """The CPU fast paths cannot run on fake tensors (numpy's mask needs a real seed): the planner switches
    them off itself, so a model with dropout traces, while the same model with them on does not."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    small_raw["model"]["dropout_rate"] = 0.1
    cfg = build_config(small_raw)
    dims = plan_dims(cfg)
    assert trace_step(cfg, dims, 8, "fp32", "all").activations > 0
    length = cfg.data.sequence_length
    with FakeTensorMode(), pytest.raises(DataDependentOutputException):   # int() of a fake seed
        model = build_model(cfg.model, dims, 1).train()                    # fast paths on: built for the CPU
        model(torch.randn(2, length, dims.num_observed), torch.randn(2, length + dims.horizon, dims.num_known),
              torch.zeros(2, dtype=torch.int64))


def test_activations_are_linear_in_the_micro_batch_and_savers_save(plan_cfg):
    dims = plan_dims(plan_cfg)
    a16, a32, a64 = (trace_step(plan_cfg, dims, b, "fp32", "none").activations for b in (16, 32, 64))
    assert a64 - a32 == pytest.approx(2 * (a32 - a16), rel=0.02)
    fp32 = trace_step(plan_cfg, dims, 64, "fp32", "none")
    bf16 = trace_step(plan_cfg, dims, 64, "bf16", "none")
    blocks = trace_step(plan_cfg, dims, 64, "bf16", "blocks")
    everything = trace_step(plan_cfg, dims, 64, "bf16", "all")
    assert bf16.activations < 0.65 * fp32.activations
    assert everything.activations < blocks.activations < bf16.activations
    rounded = sum(-(-p.numel() * 4 // 512) * 512 for p in _params(plan_cfg, dims))   # allocator granularity
    assert fp32.parameters == bf16.parameters == rounded
    assert fp32.optimizer_state == 2 * fp32.parameters


def _params(cfg, dims):
    return list(build_model(cfg.model, dims, tasks.for_config(cfg).output_size).parameters())


def test_budget_fit_keeps_the_effective_batch_and_the_margin(plan_cfg):
    dims = plan_dims(plan_cfg)
    fit = fit_budget(plan_cfg, dims, parse_bytes("1GiB"), "bf16", "none", probe=16)
    assert fit.max_micro_batch > plan_cfg.train.samples_per_step
    assert fit.micro_batch_size * fit.gradient_accumulation_steps == plan_cfg.train.samples_per_step
    assert fit.usable_bytes == int((2**30 - 768 * 2**20) / 1.15)
    check = trace_step(plan_cfg, dims, fit.max_micro_batch, "bf16", "none").peak_bytes
    assert check <= fit.usable_bytes * 1.01           # the largest micro-batch really fits
    assert fit_budget(plan_cfg, dims, parse_bytes("700MiB"), "bf16", "none", probe=16).micro_batch_size == 0


@pytest.mark.parametrize("text, expected", [("24GiB", 24 * 2**30), ("8 GB", 8 * 10**9), ("512MiB", 2**29),
                                            ("1.5g", int(1.5 * 2**30)), ("4096", 4096)])
def test_memory_sizes_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-3GiB", "12XB", "0"])
def test_bad_memory_sizes_say_what_is_allowed(text):
    with pytest.raises(ValueError, match="allowed: a positive number with a unit such as 24GiB"):
        parse_bytes(text)


@pytest.mark.slow
def test_plan_cli_json_for_the_seed_original_on_24gib(tmp_path):
    result = run_cli(["-m", "enhanced_tft.cli", "plan", "--config", str(REPO / "configs" / "seed_original.yaml"),
                      "--gpu-memory", "24GiB", "--num-features", "64", "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["micro_batch"] == 16 and plan["configured_gradient_accumulation_steps"] == 8
    assert plan["input_features"] == 68 and plan["num_parameters"] > 5_000_000
    assert len(plan["options"]) == 9
    assert 0 < plan["peak_bytes"] < 2**30
    # the goal: the whole effective batch of 128 in one step on a 24 GiB card, and far more
    assert plan["max_micro_batch"] >= 2048
    assert plan["micro_batch_size"] == 128 and plan["gradient_accumulation_steps"] == 1


@pytest.mark.slow
def test_plan_table_and_errors(tmp_path):
    result = run_cli(["-m", "enhanced_tft.cli", "plan", "--set", "train.batch_size=8"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "precision checkpoint" in result.stdout and "<- configured" in result.stdout
    assert "fp32      none" in result.stdout
    bad = run_cli(["-m", "enhanced_tft.cli", "plan", "--gpu-memory", "big"], cwd=tmp_path)
    assert bad.returncode == 2 and "--gpu-memory='big' is not a memory size" in bad.stderr
    assert "Traceback" not in bad.stderr
