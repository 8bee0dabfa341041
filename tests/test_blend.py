"""The blend of the model and LightGBM: its weight fitted on val, its predictions and metrics after training and
in `etft evaluate`, and the proper losses it is fitted to."""
import json
import math

import pandas as pd
import pytest
import torch

from enhanced_tft import tasks
from enhanced_tft.cli import main
from enhanced_tft.evaluation import blend

pytest.importorskip("lightgbm")


def test_prediction_losses_are_the_proper_scoring_rules_of_each_task():
    p_up, label = torch.tensor([0.8, 0.3]), torch.tensor([1.0, 1.0])
    assert tasks.BinaryClassification().prediction_loss(p_up, label).tolist() == pytest.approx(
        [-math.log(0.8), -math.log(0.3)], rel=1e-6)
    probabilities = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    assert tasks.MulticlassClassification().prediction_loss(probabilities, torch.tensor([2.0, 0.0])).tolist() == \
        pytest.approx([-math.log(0.5), -math.log(0.6)], rel=1e-6)
    assert tasks.Regression().prediction_loss(torch.tensor([0.5, -1.0]), torch.tensor([1.5, -1.0])).tolist() == [1.0, 0.0]
    # pinball at 0.1, 0.5, 0.9 of quantiles (-1, 0, 1) for an outcome of 2: errors 3, 2, 1 -> 0.3, 1.0, 0.9
    quantiles = torch.tensor([[-1.0, 0.0, 1.0]])
    assert tasks.QuantileRegression().prediction_loss(quantiles, torch.tensor([2.0])).tolist() == pytest.approx(
        [(0.3 + 1.0 + 0.9) / 3], rel=1e-6)


def test_the_weight_goes_to_the_forecaster_that_is_right_and_mixes_two_with_different_errors():
    task = tasks.Regression()
    target = torch.linspace(-2, 2, 400)
    noise = torch.sin(torch.arange(400.0) * 1.7)                    # deterministic, mean about 0
    right, wrong = target.clone(), torch.zeros(400)
    assert blend.fit_weight(task, right, wrong, target).model == 1.0
    assert blend.fit_weight(task, wrong, right, target).model == 0.0
    # independent errors of equal size: the mean of the two halves the squared error
    first, second = target + noise, target + torch.roll(noise, 200) * torch.sign(torch.cos(torch.arange(400.0)))
    weight = blend.fit_weight(task, first, second, target)
    assert 0.3 <= weight.model <= 0.7
    assert weight.val_loss < min(weight.val_loss_model, weight.val_loss_strong)
    assert weight.val_loss == pytest.approx(
        float(task.prediction_loss(blend.mix(first, second, weight.model), target).double().mean()), rel=1e-9)
    # two equal forecasters: every weight ties, the one nearest 1/2 is kept
    assert blend.fit_weight(task, first, first.clone(), target).model == 0.5


def test_a_blend_of_probabilities_and_of_sorted_quantiles_stays_one():
    model, strong = torch.tensor([[0.2, 0.3, 0.5]]), torch.tensor([[0.6, 0.3, 0.1]])
    mixed = blend.mix(model, strong, 0.25)
    assert mixed.sum().item() == pytest.approx(1.0) and mixed[0, 0].item() == pytest.approx(0.25 * 0.2 + 0.75 * 0.6)
    low_high = blend.mix(torch.tensor([[-1.0, 0.0, 2.0]]), torch.tensor([[0.5, 1.0, 1.5]]), 0.4)
    assert (low_high.diff(dim=1) >= 0).all()
    with pytest.raises(ValueError, match=r"differ in shape"):
        blend.mix(torch.zeros(3), torch.zeros(4), 0.5)
    with pytest.raises(ValueError, match=r"val split is empty"):
        blend.fit_weight(tasks.Regression(), torch.zeros(0), torch.zeros(0), torch.zeros(0))


def test_a_training_run_reports_the_blend_and_evaluate_applies_its_saved_weight(trained_run, capsys):
    """summary.json's blend: a weight in [0, 1] fitted on val, metrics on the same test samples as the model;
    predictions_test.csv's blend_p_up gives those metrics again; `etft evaluate` mixes with the saved weight."""
    summary = json.loads((trained_run / "summary.json").read_text())
    record = summary["blend"]
    assert 0.0 <= record["weight_model"] <= 1.0
    assert record["weight_model"] + record["weight_strong_baseline"] == pytest.approx(1.0)
    losses = record["val_loss"]
    assert losses["blend"] <= min(losses["model"], losses["strong_baseline"]) + 1e-12   # w = 0 and 1 are candidates
    assert record["test"]["num_samples"] == summary["test"]["num_samples"]

    frame = pd.read_csv(trained_run / "predictions_test.csv")
    assert list(frame.columns)[-1] == "blend_p_up"
    again = tasks.BinaryClassification().metrics(torch.tensor(frame.blend_p_up.to_numpy()),
                                                 torch.tensor(frame.label.to_numpy()),
                                                 torch.tensor(frame.actual.to_numpy()), tasks.TargetScale())
    for key, value in record["test"].items():
        assert again[key] == pytest.approx(value, abs=1e-6), key
    curves = pd.read_csv(trained_run / "backtest_test.csv")
    assert curves["blend"].iloc[-1] - 1 == pytest.approx(summary["quant"]["blend"]["backtest"]["sign"]["total_return"],
                                                         abs=1e-5)
    log = (trained_run / "training.log").read_text()
    assert f"blend: {record['weight_model']:.2f} x ensemble + {record['weight_strong_baseline']:.2f} x LightGBM" in log

    capsys.readouterr()
    assert main(["evaluate", "--run", str(trained_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["blend"]["weight_model"] == record["weight_model"]
    for key, value in record["test"].items():
        assert result["blend"]["test"][key] == pytest.approx(value, abs=1e-6), key
    assert main(["evaluate", "--run", str(trained_run)]) == 0
    table = capsys.readouterr().out
    assert "LightGBM       blend    baseline" in table and "blend: " in table
