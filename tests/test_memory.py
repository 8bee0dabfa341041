"""Memory policies: precision choices, checkpointing identity, OOM recovery without losing a sample."""
import gc

import pytest
import torch
from test_trainer import CPU, make_trainer

from enhanced_tft.config.schema import build_config
from enhanced_tft.errors import ConfigError, OutOfMemoryGiveUp
from enhanced_tft.runtime.precision import resolve_precision

# --- precision policy -------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, name", [("auto", "fp32"), (False, "fp32"), ("fp32", "fp32"), (True, "bf16"),
                                             ("bf16", "bf16"), ("fp16", "bf16")])
def test_cpu_precision_choices(requested, name):
    policy = resolve_precision(requested, CPU)
    assert policy.name == name
    assert not policy.uses_grad_scaler            # no fp16 on the CPU, so never a scaler
    assert policy.reason


def test_fp16_on_cpu_is_refused_with_a_warning(caplog):
    with caplog.at_level("WARNING"):
        assert resolve_precision("fp16", CPU).name == "bf16"
    assert "fp16 is not supported on the CPU" in caplog.text


def test_bf16_training_step_keeps_heads_and_loss_in_float32(small_raw):
    small_raw["train"]["mixed_precision"] = "bf16"
    trainer, data = make_trainer(small_raw)
    trainer.policy = resolve_precision("bf16", CPU)
    loss = trainer.accumulate(data.splits["train"], torch.arange(16))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad.dtype == torch.float32 for p in trainer.model.parameters() if p.grad is not None)


# --- effective batch ---------------------------------------------------------------------------------

def test_effective_batch_size_derives_accumulation():
    cfg = build_config({"train": {"micro_batch_size": 16, "effective_batch_size": 128}})
    assert cfg.train.gradient_accumulation_steps == 8 and cfg.train.samples_per_step == 128


def test_effective_batch_size_must_be_a_multiple():
    with pytest.raises(ConfigError, match="effective_batch_size=100 is not a multiple of micro_batch_size=16"):
        build_config({"train": {"micro_batch_size": 16, "effective_batch_size": 100}})
    with pytest.raises(ConfigError, match="differs from effective_batch_size=128"):
        build_config({"train": {"micro_batch_size": 16, "gradient_accumulation_steps": 4, "effective_batch_size": 128}})


# --- activation checkpointing ------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["blocks", "all"])
def test_checkpointing_gives_the_same_loss_and_weights(policy, small_raw):
    small_raw["model"].update(dropout_rate=0.3, num_transformer_blocks=2)
    small_raw["train"].update(epochs=1, max_steps_per_epoch=5)
    runs = {}
    for mode in ("none", policy):
        small_raw["train"]["activation_checkpointing"] = mode
        trainer, _ = make_trainer(small_raw)
        assert trainer.model.activation_checkpointing == mode
        loss, _, _ = trainer.train_epoch(1)
        runs[mode] = (loss, {k: v.clone() for k, v in trainer.model.state_dict().items()})
    assert runs[policy][0] == pytest.approx(runs["none"][0], abs=1e-6)
    for name, weight in runs["none"][1].items():
        torch.testing.assert_close(runs[policy][1][name], weight, atol=1e-6, rtol=0, msg=name)


def test_checkpointing_saves_activation_memory(small_raw):
    small_raw["model"].update(d_model=32, num_transformer_blocks=3)
    saved = {}
    for mode in ("none", "blocks", "all"):
        small_raw["train"]["activation_checkpointing"] = mode
        trainer, data = make_trainer(small_raw)
        batch = data.splits["train"].batch(torch.arange(32))
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor
        trainer.model.train()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.model(batch["observed"], batch["known"], batch["symbol"])
        saved[mode] = total
    assert saved["blocks"] < 0.8 * saved["none"]
    assert saved["all"] < 0.5 * saved["blocks"]


# --- OOM recovery ------------------------------------------------------------------------------------

class InjectOOM:
    """Raise torch.OutOfMemoryError at chosen (phase, step, micro_index) points, once each; record what ran."""

    def __init__(self, points):
        self.points = set(points)
        self.fired = []
        self.steps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, phase, step, index, indices):
        if (phase, step, index) in self.points:
            self.points.discard((phase, step, index))
            self.fired.append((phase, step, index, indices.numel()))
            if phase == "train":
                self.steps[step] = []          # the window restarts from its first micro-batch
            raise torch.OutOfMemoryError("injected")
        if phase == "train":
            if index == 0:
                self.steps[step] = []
            self.steps[step].append(indices.clone())


def _oom_raw(small_raw):
    small_raw["model"]["dropout_rate"] = 0.0
    small_raw["train"].update(micro_batch_size=16, gradient_accumulation_steps=2, epochs=1, max_steps_per_epoch=6,
                              log_every_steps=2)
    return small_raw


def test_oom_at_first_and_middle_micro_batch_keeps_every_step_exact(small_raw, caplog, inject_faults):
    raw = _oom_raw(small_raw)
    reference, data = make_trainer(raw)
    reference.fit()
    hook = InjectOOM({("train", 1, 0), ("train", 3, 1)})
    trainer, _ = make_trainer(raw, data)
    inject_faults(hook)
    with caplog.at_level("WARNING"):
        result = trainer.fit()
    assert [f[:3] for f in hook.fired] == [("train", 1, 0), ("train", 3, 1)]
    assert result.oom_recoveries == 2 and result.micro_batch_size == 4
    assert trainer.accumulation_steps == 8 and trainer.effective_batch_size == 32
    # each optimizer step saw exactly its window: 32 distinct samples, none skipped, none twice
    assert sorted(hook.steps) == list(range(6))
    for step, micro_batches in hook.steps.items():
        seen = torch.cat(micro_batches)
        assert seen.numel() == 32 and seen.unique().numel() == 32, step
    sizes = {step: [m.numel() for m in mbs] for step, mbs in hook.steps.items()}
    assert sizes[0] == [16, 16] and sizes[1] == [8] * 4 and sizes[3] == [4] * 8 and sizes[5] == [4] * 8
    # and the maths is unchanged: same weights as the run that never ran out of memory (fp32, dropout 0)
    for (name, a), b in zip(reference.model.state_dict().items(), trainer.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)
    assert "out of memory in train step 1: micro-batch 16 -> 8, accumulation steps -> 4, effective batch 32 kept" \
        in caplog.text
    assert "micro-batch 8 -> 4, accumulation steps -> 8" in caplog.text


def test_oom_during_validation_is_survived(small_raw, caplog, inject_faults):
    raw = _oom_raw(small_raw)
    reference, data = make_trainer(raw)
    expected = reference.evaluate("val")
    trainer, _ = make_trainer(raw, data)
    inject_faults(InjectOOM({("val", 0, 1), ("val", 0, 4)}))
    with caplog.at_level("WARNING"):
        got = trainer.evaluate("val")
    assert trainer.eval_batch_size == 8 and trainer.micro_batch_size == 16
    torch.testing.assert_close(got.prediction, expected.prediction)
    assert got.loss == pytest.approx(expected.loss, rel=1e-6)
    assert "out of memory in val: evaluation chunk 32 -> 16; redoing the chunk" in caplog.text


def test_give_up_at_micro_batch_one_names_the_keys(small_raw, inject_faults):
    raw = _oom_raw(small_raw)
    raw["train"].update(micro_batch_size=2, gradient_accumulation_steps=1)
    trainer, _ = make_trainer(raw)
    inject_faults(lambda phase, step, index, indices: (_ for _ in ()).throw(torch.OutOfMemoryError("x")))
    with pytest.raises(OutOfMemoryGiveUp) as err:
        trainer.fit()
    message = str(err.value)
    assert "even at micro-batch 1" in message
    for key in ("train.activation_checkpointing=all", "data.sequence_length", "model.d_model", "etft plan"):
        assert key in message


def test_no_live_tensor_growth_across_five_members(small_raw):
    """Five members in one process: after the first, the live tensors and their bytes stay flat."""
    from conftest import training_model
    from enhanced_tft.data.pipeline import build_data
    from enhanced_tft.runtime.memory import release_memory
    from enhanced_tft.training.trainer import Trainer

    small_raw["train"].update(epochs=1, max_steps_per_epoch=3)
    cfg = build_config(small_raw)
    data = build_data(cfg)

    def live():
        gc.collect()
        tensors = [o for o in gc.get_objects() if type(o) is torch.Tensor or type(o) is torch.nn.Parameter]
        return len(tensors), sum(t.numel() * t.element_size() for t in tensors)

    counts = []
    for member in range(5):
        torch.manual_seed(member)
        model = training_model(cfg, data)
        trainer = Trainer(model, data, cfg, CPU, resolve_precision("fp32", CPU), seed=member, member=member)
        try:
            trainer.fit()
            trainer.evaluate("test")
        finally:
            trainer.close()
            del trainer, model
            release_memory(CPU)
        counts.append(live())
    assert all(c == counts[0] for c in counts[1:]), counts


@pytest.mark.parametrize("bf16_ok, requested, name, scaler", [
    (True, "auto", "bf16", False), (False, "auto", "fp16", True), (True, True, "bf16", False),
    (False, "bf16", "fp16", True), (True, "fp16", "fp16", True), (True, "fp32", "fp32", False),
])
def test_gpu_precision_choices(monkeypatch, bf16_ok, requested, name, scaler):
    """The CUDA branch of the policy, with the GPU's bf16 support stubbed (no GPU on this machine)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_ok)
    policy = resolve_precision(requested, torch.device("cuda"))
    assert (policy.name, policy.uses_grad_scaler) == (name, scaler)
    assert policy.autocast_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def test_ensemble_keeps_the_shrunk_micro_batch_and_gives_up_cleanly(small_raw, tmp_path, inject_faults):
    """After an OOM the next member starts at the working size; at micro-batch 1 the run stops with a checkpoint."""
    import json

    from enhanced_tft import tasks
    from enhanced_tft.data.pipeline import build_data
    from enhanced_tft.runs import RunFolder
    from enhanced_tft.training.ensemble import train_ensemble

    raw = _oom_raw(small_raw)
    raw["train"]["ensemble_size"] = 2
    cfg = build_config(raw)
    data = build_data(cfg)
    run = RunFolder.create(tmp_path)
    inject_faults(InjectOOM({("train", 2, 0)}))
    summary = train_ensemble(cfg, tasks.for_config(cfg), data, CPU, resolve_precision("fp32", CPU), run).summary
    members = summary["ensemble"]["members"]
    assert [m["oom_recoveries"] for m in members] == [1, 0]
    assert [m["micro_batch_size"] for m in members] == [8, 8]

    raw["train"].update(micro_batch_size=1, gradient_accumulation_steps=2, ensemble_size=1)
    cfg = build_config(raw)
    run = RunFolder.create(tmp_path)

    def always(phase, step, index, indices):
        raise torch.OutOfMemoryError("injected")
    inject_faults(always)
    with pytest.raises(OutOfMemoryGiveUp, match=r"Last weights: .*member_0_step_000000000\.pt"):
        train_ensemble(cfg, tasks.for_config(cfg), data, CPU, resolve_precision("fp32", CPU), run)
    assert (run.path / "checkpoints" / "member_0_step_000000000.pt").is_file()
    saved = json.loads((run.path / "summary.json").read_text())
    assert saved["status"] == "out_of_memory" and "even at micro-batch 1" in saved["error"]
