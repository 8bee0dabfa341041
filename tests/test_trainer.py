import math

import pytest
import torch

from conftest import training_model
from enhanced_tft.config.schema import build_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.runtime.precision import resolve_precision
from enhanced_tft.tasks import BinaryClassification
from enhanced_tft.training.optim import lr_lambda
from enhanced_tft.training.trainer import Trainer

CPU = torch.device("cpu")


def make_trainer(raw: dict, data=None, seed: int | None = None):
    cfg = build_config(raw)
    data = data or build_data(cfg)
    torch.manual_seed(cfg.seed if seed is None else seed)
    model = training_model(cfg, data)
    return Trainer(model, data, cfg, CPU, resolve_precision("fp32", CPU), seed=cfg.seed), data


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def test_accumulation_gives_the_gradient_of_one_large_batch(small_raw):
    small_raw["model"]["dropout_rate"] = 0.0
    small_raw["train"].update(micro_batch_size=32, gradient_accumulation_steps=1)
    large, data = make_trainer(small_raw)
    window = torch.arange(32)
    large_loss = large.accumulate(data.splits["train"], window)
    small_raw["train"].update(micro_batch_size=8, gradient_accumulation_steps=4)
    micro, _ = make_trainer(small_raw, data)
    micro_loss = micro.accumulate(data.splits["train"], window)
    assert micro.micro_batch_size == 8 and micro.effective_batch_size == 32
    torch.testing.assert_close(micro_loss, large_loss, atol=1e-5, rtol=0)
    g_large, g_micro = _grads(large), _grads(micro)
    assert g_large.keys() == g_micro.keys() and len(g_large) > 10
    for name in g_large:
        torch.testing.assert_close(g_micro[name], g_large[name], atol=1e-5, rtol=1e-5, msg=name)


def test_uneven_last_micro_batch_still_matches(small_raw):
    """A window of 30 split as 8+8+8+6 weighs every sample equally, like one batch of 30."""
    small_raw["model"]["dropout_rate"] = 0.0
    small_raw["train"].update(micro_batch_size=30)
    large, data = make_trainer(small_raw)
    large.accumulate(data.splits["train"], torch.arange(30))
    small_raw["train"].update(micro_batch_size=8, gradient_accumulation_steps=4)
    micro, _ = make_trainer(small_raw, data)
    micro.accumulate(data.splits["train"], torch.arange(30))
    for name, grad in _grads(large).items():
        torch.testing.assert_close(_grads(micro)[name], grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("task", ["regression", "quantile", "classification_binary", "classification_multiclass"])
def test_every_task_trains_and_its_loss_falls(task, small_raw):
    small_raw["task"] = task
    small_raw["data"]["num_bars"] = 1200
    small_raw["train"].update(epochs=3, learning_rate=3e-3)
    trainer, data = make_trainer(small_raw)
    before = trainer.evaluate("train").loss
    result = trainer.fit()
    assert trainer.evaluate("val").loss == pytest.approx(result.best_val_loss, rel=1e-6)   # best weights restored
    after = trainer.evaluate("train").loss
    assert after < 0.97 * before, f"{task}: train loss {before:.4f} -> {after:.4f}"
    assert result.optimizer_steps == result.epochs_run * trainer.steps_per_epoch


@pytest.mark.slow
def test_binary_classifier_beats_the_majority_rate_on_planted_signal():
    raw = {"task": "classification_binary", "seed": 3,
           "data": {"num_symbols": 5, "num_bars": 1500, "sequence_length": 24},
           "model": {"d_model": 32, "num_heads": 4, "num_transformer_blocks": 1, "ff_dim": 64,
                     "variable_hidden_size": 8},
           "train": {"micro_batch_size": 64, "epochs": 4, "learning_rate": 3e-3}}
    trainer, data = make_trainer(raw)
    trainer.fit()
    test = trainer.evaluate("test")
    metrics = BinaryClassification().metrics(test.prediction, test.target, test.raw_return, data.target_scale())
    assert metrics["num_samples"] > 900
    # oracle is 0.600; the majority rate is about 0.5; need at least +5 points
    assert metrics["accuracy"] >= metrics["majority_rate"] + 0.05, metrics
    assert metrics["auc"] > 0.56


def test_training_is_repeatable_with_a_seed(small_raw):
    small_raw["train"].update(epochs=1)
    first, data = make_trainer(small_raw)
    first.fit()
    second, _ = make_trainer(small_raw, data)
    second.fit()
    for (name, a), b in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_warmup_then_cosine_schedule():
    factor = lr_lambda(total_steps=110, warmup_steps=10, min_ratio=0.1)
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(110) == pytest.approx(0.1)


def test_early_stopping_stops_and_keeps_the_best(small_raw):
    small_raw["train"].update(epochs=30, early_stopping_patience=1, learning_rate=0.05)
    trainer, _ = make_trainer(small_raw)
    records = []
    trainer.on_epoch_end = records.append
    result = trainer.fit()
    assert result.stopped_early and result.epochs_run < 30
    assert result.epochs_run == result.best_epoch + 1
    assert [r["epoch"] for r in records] == list(range(1, result.epochs_run + 1))
    assert min(r["loss/val"] for r in records) == pytest.approx(result.best_val_loss)


def test_no_weight_decay_on_biases_norms_and_per_variable_vectors(small_raw):
    from enhanced_tft.training.optim import param_groups
    trainer, _ = make_trainer(small_raw)
    decayed = {id(p) for p in param_groups(trainer.model, 0.01)[0]["params"]}
    names = {n for n, p in trainer.model.named_parameters() if id(p) in decayed}
    assert "past_selection.w_in" in names and "blocks.0.qkv.weight" in names
    for name in ("past_selection.norm_weight", "past_selection.b_in", "past_selection.b_gate",
                 "past_selection.embed_bias", "blocks.0.attn_norm.weight", "head.linear.bias"):
        assert name not in names
