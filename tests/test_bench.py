"""`etft bench`: its saved-activation count on a module worked out by hand, its JSON rows, its input errors."""
import json
import os
import platform
import sys

import pytest
import torch
import yaml
from torch import nn

from conftest import REPO
from enhanced_tft.cli import main
from enhanced_tft.config.schema import build_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.training.bench import JSON_KEYS, saved_bytes, with_observed_features


class _LinearReluSquare(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.relu(self.linear(x))
        return hidden * hidden       # saves `hidden` twice more: one storage, counted once


def test_saved_bytes_counts_each_storage_once_and_leaves_out_parameters():
    """By hand, batch 5: addmm saves its input x (5x4 floats, for the weight's gradient; the weight itself is a
    parameter), relu saves its output (5x3), the square saves that same output twice: (20 + 15) * 4 bytes."""
    torch.manual_seed(0)
    model = _LinearReluSquare()
    x = torch.randn(5, 4)
    result = saved_bytes(model, lambda: model(x).sum(), batch_size=5)
    assert result["saved_total_bytes"] - result["saved_param_bytes"] == (20 + 15) * 4
    assert result["saved_bytes_per_sample"] == pytest.approx(28.0)
    # with the input needing a gradient too, addmm also saves the weight: a parameter, so the figure stays
    result = saved_bytes(model, lambda: model(x.requires_grad_()).sum(), batch_size=5)
    assert result["saved_bytes_per_sample"] == pytest.approx(28.0)
    assert result["saved_param_bytes"] == 3 * 4 * 4


@pytest.fixture
def tiny_yaml(tmp_path, small_raw):
    small_raw["model"]["dropout_rate"] = 0.1
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(small_raw))
    return path


def test_observed_feature_count_is_set_through_the_pipelines_extra_inputs(small_raw):
    cfg = build_config(small_raw)
    data = build_data(cfg)
    have = data.num_observed
    wide = build_data(with_observed_features(cfg, have + 5))
    assert wide.num_observed == have + 5 and wide.observed_names[have:] == [f"x_{i}" for i in range(1, 6)]
    train = wide.splits["train"]
    extra = train.arrays.observed[train.sample_ends][:, have:]    # the train rows (but each window's first T-1)
    assert extra.mean(0).abs().max() < 0.05 and (extra.std(0) - 1).abs().max() < 0.05   # scaled on train
    for name, split in data.splits.items():
        assert torch.equal(wide.splits[name].sample_ends, split.sample_ends)
    batch = wide.splits["train"].batch(torch.arange(4))
    assert batch["observed"].shape == (4, small_raw["data"]["sequence_length"], have + 5)
    assert torch.equal(batch["observed"][..., :have], data.splits["train"].batch(torch.arange(4))["observed"])
    with pytest.raises(ValueError, match=f"--num_features=3; allowed: at least {have}"):
        with_observed_features(cfg, 3)


@pytest.mark.slow
def test_json_rows_have_the_keys_and_sane_values(tiny_yaml, tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["bench", "--config", str(tiny_yaml), "--num_features", "13", "20", "--precision", "fp32", "bf16",
                 "--json", str(out), "--repeats", "2", "--warmup", "1", "--seconds", "0.05"])
    assert code == 0
    table = capsys.readouterr().out
    assert "train/s" in table and "tiny" in table
    rows = json.loads(out.read_text())
    assert [(r["config"], r["num_features"], r["precision"]) for r in rows] == [
        ("tiny", 13, "fp32"), ("tiny", 13, "bf16"), ("tiny", 20, "fp32"), ("tiny", 20, "bf16")]
    for row in rows:
        assert set(JSON_KEYS) <= row.keys()
        assert row["train_samples_per_s"] > 0 and row["infer_samples_per_s"] > 0
        assert len(row["train_repeats"]) == 2
        assert row["train_samples_per_s"] == pytest.approx(sum(row["train_repeats"]) / 2, rel=1e-3)   # median of 2
        assert 0 < row["saved_bytes_per_sample"] < 2**20
        assert row["peak_memory_bytes"] > 4 * row["params"]          # at least the weights and AdamW's moments
    by_key = {(r["num_features"], r["precision"]): r for r in rows}
    assert by_key[(13, "fp32")]["params"] == by_key[(13, "bf16")]["params"] < by_key[(20, "fp32")]["params"]
    # bf16 autocast stores most activations in two bytes instead of four
    assert by_key[(20, "bf16")]["saved_bytes_per_sample"] < 0.8 * by_key[(20, "fp32")]["saved_bytes_per_sample"]
    # more inputs, more saved activations
    assert by_key[(20, "fp32")]["saved_bytes_per_sample"] > by_key[(13, "fp32")]["saved_bytes_per_sample"]


@pytest.mark.parametrize("args, message", [
    (["--num_features", "0"], "--num_features=0; allowed: integers >= 1"),
    (["--precision", "fp8"], "--precision='fp8'; allowed: fp32, bf16, fp16"),
    (["--repeats", "0"], "allowed: repeats >= 1"),
    (["--config", "no_such.yaml"], "config file 'no_such.yaml' does not exist"),
    (["--set", "model.d_model=wide"], "model.d_model='wide'"),
    (["--threads", "0"], "--threads=0; allowed: an integer >= 1"),
])
def test_bad_input_exits_2_with_a_message(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("etft bench: error:") and message in err


def test_bench_json_keeps_an_existing_file_unless_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    existing = tmp_path / "rows.json"
    existing.write_text("[] # yesterday's numbers\n")
    assert main(["bench", "--json", str(existing), "--repeats", "1"]) == 2
    assert f"--json {str(existing)!r} exists; add --overwrite to replace it" in capsys.readouterr().err
    assert existing.read_text() == "[] # yesterday's numbers\n"          # refused before any benchmark ran
    assert main(["bench", "--json", str(tmp_path), "--repeats", "1"]) == 2
    assert "is a folder; allowed: a file path" in capsys.readouterr().err


def test_a_failing_compile_falls_back_to_the_eager_model(small_raw, monkeypatch, caplog):
    import contextlib

    from enhanced_tft.model.build import build_model
    from enhanced_tft.model.tft import ModelDims
    from enhanced_tft.training.compile import apply_compile

    def broken_compile(self, *args, **kwargs):   # what a missing C++ compiler looks like: the first call raises
        def fail(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler found")
        self._compiled_call_impl = fail

    monkeypatch.setattr(torch.nn.Module, "compile", broken_compile)
    cfg = build_config(small_raw)
    model = build_model(cfg.model, ModelDims(5, 4, 2, 1), output_size=1)
    batch = {"observed": torch.randn(4, 16, 5), "known": torch.randn(4, 17, 4),
             "symbol": torch.zeros(4, dtype=torch.int64), "target": torch.ones(4)}
    with caplog.at_level("WARNING"):
        assert apply_compile(model, True, batch, contextlib.nullcontext) is False
    assert "training the eager model instead" in caplog.text and "no working C++ compiler" in caplog.text
    assert model(batch["observed"], batch["known"], batch["symbol"]).output.shape == (4, 1)
    assert all(p.grad is None for p in model.parameters())


def test_threads_follow_omp_num_threads_when_the_user_set_it(monkeypatch):
    from enhanced_tft.runtime.threads import available_cpus, configure_threads
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert configure_threads() == available_cpus() == torch.get_num_threads()
        assert configure_threads(3) == 3
    finally:
        torch.set_num_threads(before)


FAULTS_SCRIPT = """
import resource, statistics, sys
from enhanced_tft.runtime.threads import tune_host_allocator
tuned = tune_host_allocator() if sys.argv[1] == "tuned" else False
import torch
counts = []
for _ in range(25):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(10 * 2**20)                 # 40 MiB allocated, written and freed
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(tuned, statistics.median(counts))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_tuned_allocator_reuses_freed_memory_instead_of_faulting_in_new_pages(tmp_path):
    """25 allocations of 40 MiB: glibc's default maps fresh pages each time (blocks over 32 MiB are always
    mapped: 10240 page faults each); tuned, the freed block is reused (the median allocation faults in no
    new page; the kernel may still reclaim the idle block now and then). THP_MEM_ALLOC_ENABLE=0 (a user's
    value stays) keeps pages at 4 KiB."""
    import subprocess
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "THP_MEM_ALLOC_ENABLE": "0"}
    faults = {}
    for mode in ("default", "tuned"):
        out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT, mode], env=env, capture_output=True, text=True,
                             cwd=tmp_path, timeout=120)
        assert out.returncode == 0, out.stderr
        took, median = out.stdout.split()
        assert took == ("True" if mode == "tuned" else "False")
        faults[mode] = float(median)
    assert faults["default"] > 5000               # fresh pages every time
    assert faults["tuned"] < 100


def test_allocator_tuning_leaves_a_users_settings(monkeypatch):
    from enhanced_tft.runtime.threads import GLIBC_MALLOC_SETTINGS, tune_host_allocator
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    for name in GLIBC_MALLOC_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    tune_host_allocator()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE")
    tuned = tune_host_allocator()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    assert tuned == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")     # the user configured glibc: leave it alone
    assert tune_host_allocator() is False
