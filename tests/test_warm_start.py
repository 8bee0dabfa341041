"""The linear skip fitted before the body trains: the fit finds the planted linear rule of each loss, the model
starts as that rule with its body's read-out at zero, and the fit reads the inputs the model sees."""
import logging

import pytest
import torch

from enhanced_tft import tasks
from enhanced_tft.config.schema import load_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.model.build import build_model, dims_for
from enhanced_tft.model.heads import OutputHead
from enhanced_tft.training.warm_start import fit_linear_skip, last_bar_inputs, start_from_linear_rule


def _planted(n=6000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return x, g


def test_the_fit_recovers_a_planted_logistic_rule():
    """logit = 1.5 x0 - 0.5 x1 + 0.2 on 6,000 samples: the maximum-likelihood weights are within 0.1 of the truth
    (their standard errors are about 0.04)."""
    x, g = _planted()
    logit = 1.5 * x[:, 0] - 0.5 * x[:, 1] + 0.2
    y = (torch.rand(len(x), generator=g) < torch.sigmoid(logit)).float()
    torch.manual_seed(1)
    skip = OutputHead(3, 1)
    weights, before, after = fit_linear_skip(skip, tasks.BinaryClassification(), x, y)
    assert weights["linear.weight"][0].tolist() == pytest.approx([1.5, -0.5, 0.0], abs=0.1)
    assert weights["linear.bias"].item() == pytest.approx(0.2, abs=0.1)
    assert after < before
    # the optimum: the gradient of the mean log loss vanishes there
    skip.load_state_dict(weights)
    loss = tasks.BinaryClassification().loss(skip(x), y).mean()
    grads = torch.autograd.grad(loss, list(skip.parameters()))
    assert max(float(gr.abs().max()) for gr in grads) < 1e-4


def test_the_fit_follows_the_tasks_loss_quantiles_get_their_own_lines():
    """y = 2 x0 + N(0, 1): the quantile task's three outputs get slope 2 and intercepts at the normal's P10, P50
    and P90 (-1.28, 0, 1.28), within sampling error."""
    x, g = _planted(8000)
    y = 2.0 * x[:, 0] + torch.randn(len(x), generator=g)
    weights, _, _ = fit_linear_skip(OutputHead(3, 3), tasks.QuantileRegression(), x, y)
    assert weights["linear.weight"][:, 0].tolist() == pytest.approx([2.0, 2.0, 2.0], abs=0.1)
    assert weights["linear.bias"].tolist() == pytest.approx([-1.2816, 0.0, 1.2816], abs=0.1)


def test_the_model_starts_as_the_linear_rule_on_the_inputs_it_sees(caplog):
    cfg = load_config(None, ["data.num_symbols=2", "data.num_bars=600", "data.sequence_length=16",
                             "model.d_model=16", "model.num_heads=2", "model.num_transformer_blocks=1",
                             "model.ff_dim=16", "model.variable_hidden_size=4"])
    data = build_data(cfg)
    task = tasks.for_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, dims_for(data.transform), task.output_size).eval()
    train = data.splits["train"]
    before, after = start_from_linear_rule(model, task, train, torch.device("cpu"))
    assert after < before
    batch = train.batch(train.all_indices()[:64])
    with torch.no_grad():
        output = model(batch["observed"], batch["known"], batch["symbol"]).output
    assert torch.equal(output, model.skip(batch["observed"][:, -1]))        # the body's read-out is zero
    inputs, target = last_bar_inputs(train)
    assert torch.equal(inputs[:64], batch["observed"][:, -1]) and torch.equal(target[:64], batch["target"])
    assert task.loss(model.skip(inputs), target).mean().item() == pytest.approx(after, rel=1e-6)


def test_a_large_split_is_read_at_evenly_spaced_samples():
    cfg = load_config(None, ["data.num_symbols=2", "data.num_bars=600", "data.sequence_length=16"])
    train = build_data(cfg).splits["train"]
    everything, _ = last_bar_inputs(train)
    some, _ = last_bar_inputs(train, max_rows=50)
    picked = torch.linspace(0, len(train) - 1, 50).round().long()
    assert len(some) == 50 and torch.equal(some, everything[picked])
    assert torch.equal(some[0], everything[0]) and torch.equal(some[-1], everything[-1])


def test_a_fresh_member_logs_the_fit_and_a_model_without_the_skip_does_not_fit(tmp_path, caplog):
    from enhanced_tft.cli import main
    caplog.set_level(logging.INFO, logger="enhanced_tft")
    args = ["train", "--test_mode", "--log_dir", str(tmp_path), "--set", "train.epochs=1", "--set",
            "train.max_steps_per_epoch=2", "--set", "train.strong_baseline=false", "--set", "run.report=false"]
    assert main(args) == 0
    assert "member 0: linear skip fitted to the last bar's inputs (train loss" in caplog.text
    caplog.clear()
    assert main(args + ["--set", "model.linear_skip=false"]) == 0
    assert "linear skip fitted" not in caplog.text


def test_a_loss_that_is_not_finite_leaves_the_skip_as_it_was():
    x, _ = _planted(200)
    skip = OutputHead(3, 1)
    initial = {k: v.clone() for k, v in skip.state_dict().items()}
    target = torch.full((200,), float("nan"))
    weights, before, after = fit_linear_skip(skip, tasks.Regression(), x, target)
    assert all(torch.equal(weights[k], initial[k]) for k in initial) and before != before and after != after
