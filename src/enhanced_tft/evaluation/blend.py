"""The blend: a convex combination of the model (the ensemble's mean prediction) and LightGBM, whose weight is
fitted on the val split and then applied, unchanged, to the test split and to any data `etft evaluate` scores.

    blend = w * model + (1 - w) * LightGBM,   w in {0, 0.01, ..., 1}

on what `Task.predict` gives (probabilities for classifiers, scaled values or sorted quantiles otherwise), so a
blend of probabilities is a probability and a blend of sorted quantiles stays sorted. w minimises the mean of
`Task.prediction_loss` on val (log loss for classifiers, squared error of the value, pinball loss of quantiles);
a tie goes to the weight nearest 1/2. The two forecasters make different errors: where neither dominates, the
blend's val loss is below both, and w = 0 or 1 says that one of them adds nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tasks import Task

GRID = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
RULE = ("w x model + (1 - w) x LightGBM, w fitted on the val split (grid of 0.01) to the task's proper loss, "
        "then applied unchanged")


@dataclass(frozen=True)
class BlendWeight:
    model: float            # w: the model's share; LightGBM's is 1 - w
    val_loss: float         # mean val loss of the blend at w
    val_loss_model: float   # ... of the model alone (w = 1)
    val_loss_strong: float  # ... of LightGBM alone (w = 0)

    def to_summary(self) -> dict:
        return {"weight_model": self.model, "weight_strong_baseline": round(1.0 - self.model, 2),
                "val_loss": {"blend": self.val_loss, "model": self.val_loss_model, "strong_baseline": self.val_loss_strong}}


def mix(model: torch.Tensor, strong: torch.Tensor, weight: float) -> torch.Tensor:
    """The blend's predictions (float32) from the two forecasters' predictions of the same samples."""
    if model.shape != strong.shape:
        raise ValueError(f"the model's predictions {tuple(model.shape)} and LightGBM's {tuple(strong.shape)} differ "
                         "in shape; they must cover the same samples")
    return (weight * model.double() + (1.0 - weight) * strong.double()).float()


def fit_weight(task: Task, model_val: torch.Tensor, strong_val: torch.Tensor, target_val: torch.Tensor) -> BlendWeight:
    """The grid weight with the lowest mean val loss (ties: the one nearest 1/2)."""
    if len(target_val) == 0:
        raise ValueError("the val split is empty: a blend weight cannot be fitted")
    losses = torch.stack([task.prediction_loss(mix(model_val, strong_val, float(w)), target_val).double().mean()
                          for w in GRID])
    best = float(losses.min())
    tied = torch.nonzero(losses <= best + 1e-12)[:, 0]
    index = int(tied[torch.argmin((GRID[tied] - 0.5).abs())])
    return BlendWeight(round(float(GRID[index]), 2), float(losses[index]), float(losses[-1]), float(losses[0]))
