"""fp16 with dynamic loss scaling (GradScaler), built on the CPU.

resolve_precision never picks fp16 on the CPU (it warns and runs bf16), but torch runs fp16 autocast and
GradScaler("cpu") there, so the trainer's fp16 path is tested with the policy built directly. What it must do: start
at GradScaler's initial scale, skip the optimizer step and halve the scale after an inf gradient, and count only
NaN/inf losses (or overflows once the scale no longer amplifies, <= 1) toward train.max_nonfinite_steps: the
back-offs while the scale calibrates are GradScaler's job, not a diverging run.
"""
import pytest
import torch

from conftest import training_model
from enhanced_tft.config.schema import build_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.errors import NonFiniteGiveUp
from enhanced_tft.runtime.precision import PrecisionPolicy
from enhanced_tft.training.trainer import Trainer

CPU = torch.device("cpu")
FP16 = PrecisionPolicy("fp16", "fp16 built on the CPU for this test", "cpu")
CALM_SCALE = 2.0**8     # small enough that this model's gradients never overflow fp16 at it
WINDOW = torch.arange(32)


def fp16_trainer(raw: dict, init_scale: float | None = None, data=None) -> tuple[Trainer, object]:
    cfg = build_config(raw)
    data = data or build_data(cfg)
    torch.manual_seed(cfg.seed)
    trainer = Trainer(training_model(cfg, data), data, cfg, CPU, FP16, seed=cfg.seed)
    if init_scale is not None:
        trainer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    return trainer, data


def _weights(trainer):
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def _adam_steps(trainer) -> set[float]:
    return {float(state["step"]) for state in trainer.optimizer.state.values()}


def test_the_fp16_path_runs_on_the_cpu_from_the_initial_scale(small_raw):
    trainer, data = fp16_trainer(small_raw)
    assert FP16.uses_grad_scaler and FP16.autocast_dtype == torch.float16
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**16   # GradScaler's init_scale
    with FP16.autocast():
        assert torch.nn.functional.linear(torch.ones(2, 3), torch.ones(4, 3)).dtype == torch.float16
    loss = trainer.train_window(data.splits["train"], WINDOW)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert len(grads) > 10 and all(g.dtype == torch.float32 for g in grads)   # scaled, in the parameters' dtype


def test_an_inf_gradient_skips_the_step_and_halves_the_scale_without_ending_the_run(small_raw, caplog):
    small_raw["train"]["max_nonfinite_steps"] = 1      # one counted step would stop the run
    trainer, data = fp16_trainer(small_raw, init_scale=CALM_SCALE)
    split = data.splits["train"]
    before = _weights(trainer)
    loss = trainer.train_window(split, WINDOW)
    next(p for p in trainer.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
    with caplog.at_level("INFO"):
        trainer.optimizer_step(loss)
    assert trainer.scaler.get_scale() == CALM_SCALE / 2
    assert all(torch.equal(p, before[name]) for name, p in _weights(trainer).items())   # step skipped
    assert _adam_steps(trainer) == {0.0}                                                 # AdamW never stepped
    assert trainer.skipped_steps == 1
    assert (trainer.progress.nonfinite_steps, trainer.progress.nonfinite_in_a_row) == (0, 0)
    assert "fp16 gradients overflowed at a finite loss, step skipped; loss scale now 128 (calibration, not " \
           "counted toward train.max_nonfinite_steps)" in caplog.text
    # the next, clean window steps at the lowered scale
    trainer.optimizer_step(trainer.train_window(split, WINDOW + 32))
    assert trainer.scaler.get_scale() == CALM_SCALE / 2 and _adam_steps(trainer) == {1.0}
    assert any(not torch.equal(p, before[name]) for name, p in _weights(trainer).items())
    assert trainer.skipped_steps == 1


def test_a_nan_loss_counts_toward_the_limit(small_raw, caplog):
    small_raw["train"]["max_nonfinite_steps"] = 2
    trainer, data = fp16_trainer(small_raw, init_scale=CALM_SCALE)
    original = trainer.task.loss
    trainer.task.loss = lambda output, target: original(output, target) * float("nan")
    split = data.splits["train"]
    with caplog.at_level("WARNING"):
        trainer.optimizer_step(trainer.train_window(split, WINDOW))
    assert trainer.scaler.get_scale() == CALM_SCALE / 2 and trainer.skipped_steps == 1
    assert (trainer.progress.nonfinite_steps, trainer.progress.nonfinite_in_a_row) == (1, 1)
    assert "NaN/inf loss or gradient, step skipped (1 in a row, 1 in all); fp16 loss scale now 128" in caplog.text
    with pytest.raises(NonFiniteGiveUp, match="2 optimizer steps in a row had NaN/inf"):
        trainer.optimizer_step(trainer.train_window(split, WINDOW))


def test_an_overflow_once_the_scale_no_longer_amplifies_counts(small_raw):
    small_raw["train"]["max_nonfinite_steps"] = 2
    trainer, data = fp16_trainer(small_raw, init_scale=1.0)
    split = data.splits["train"]
    for expected_scale in (0.5, None):
        loss = trainer.train_window(split, WINDOW)
        next(p for p in trainer.model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        if expected_scale is None:
            with pytest.raises(NonFiniteGiveUp, match="2 optimizer steps in a row"):
                trainer.optimizer_step(loss)
        else:
            trainer.optimizer_step(loss)
            assert trainer.scaler.get_scale() == expected_scale
            assert (trainer.progress.nonfinite_steps, trainer.skipped_steps) == (1, 1)


def test_loss_scale_calibration_at_the_start_does_not_end_a_run(small_raw):
    """From a scale of 2**20 this model's scaled gradients overflow fp16 for several steps before GradScaler has
    halved its way down: more skipped steps than max_nonfinite_steps, all of them calibration."""
    small_raw["train"].update(epochs=1, max_steps_per_epoch=8, max_nonfinite_steps=2)
    # the body's whole gradient from the first step: with the linear skip its read-out starts at zero, and the
    # first gradients are too small to overflow at this scale
    small_raw["model"]["linear_skip"] = False
    trainer, _ = fp16_trainer(small_raw, init_scale=2.0**20)
    result = trainer.fit()
    skipped = trainer.skipped_steps
    assert 2 < skipped < 8
    assert trainer.progress.nonfinite_steps == 0
    assert trainer.scaler.get_scale() == 2.0**20 / 2**skipped      # one halving per skipped step, no growth yet
    assert result.optimizer_steps == 8 and _adam_steps(trainer) == {8.0 - skipped}
    assert result.epochs_run == 1 and result.best_val_loss == pytest.approx(trainer.evaluate("val").loss, rel=1e-6)
