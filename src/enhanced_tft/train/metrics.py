"""Task metrics and the naive baselines they are compared with. Everything in float32 on the CPU."""
from __future__ import annotations

import torch
from torchmetrics.functional.classification import binary_auroc, multiclass_auroc, multiclass_recall

from ..model.heads import QUANTILES


def task_metrics(task: str, prediction: torch.Tensor, target: torch.Tensor, raw_return: torch.Tensor,
                 target_std: float, target_mean: float = 0.0, volatility: bool = False) -> dict[str, float]:
    """prediction as TaskHead.predict returns it; target as the task's labels; raw_return the raw target in its
    own units (forward log return, or forward realized volatility when `volatility`)."""
    prediction, target, raw_return = prediction.float().cpu(), target.float().cpu(), raw_return.float().cpu()
    if task == "classification_binary":
        labels = target.long()
        hard = (prediction > 0.5).long()
        return {
            "accuracy": float((hard == labels).float().mean()),
            "balanced_accuracy": float(multiclass_recall(hard, labels, num_classes=2, average="macro")),
            "auc": float(binary_auroc(prediction, labels)),
            "up_rate": float(labels.float().mean()),
            "majority_rate": float(max(labels.float().mean(), 1 - labels.float().mean())),
            "num_samples": int(labels.numel()),
        }
    if task == "classification_multiclass":
        labels = target.long()
        hard = prediction.argmax(dim=1)
        return {
            "accuracy": float((hard == labels).float().mean()),
            "balanced_accuracy": float(multiclass_recall(hard, labels, num_classes=3, average="macro")),
            "auc": float(multiclass_auroc(prediction, labels, num_classes=3, average="macro")),
            "num_samples": int(labels.numel()),
        }
    if task == "regression":
        value = prediction * target_std + target_mean
        error = value - raw_return
        out = {"mae": float(error.abs().mean()), "rmse": float(error.pow(2).mean().sqrt())}
        if not volatility:
            out["direction_accuracy"] = float(((value > 0) == (raw_return > 0)).float().mean())
        return {**out, "num_samples": int(raw_return.numel())}
    quantiles = torch.tensor(QUANTILES)
    values = prediction * target_std + target_mean                       # (N, Q)
    error = raw_return.unsqueeze(1) - values
    pinball = torch.maximum(quantiles * error, (quantiles - 1) * error)
    inside = (raw_return >= values[:, 0]) & (raw_return <= values[:, -1])
    return {
        "quantile_loss": float(pinball.mean()),
        "coverage_p10_p90": float(inside.float().mean()),
        "mae_p50": float((values[:, 1] - raw_return).abs().mean()),
        "num_samples": int(raw_return.numel()),
    }


def baseline_prediction(task: str, train_target: torch.Tensor, train_return: torch.Tensor, target_std: float,
                        num_samples: int, target_mean: float = 0.0) -> torch.Tensor:
    """The naive rule, fitted on train: majority class / class frequencies, zero return (the train mean of a
    volatility target), train quantiles."""
    if task == "classification_binary":
        majority = float(train_target.float().mean() > 0.5)
        # probability just off 0.5 towards the majority: accuracy = majority rate, AUC = 0.5
        return torch.full((num_samples,), 0.5 + (majority - 0.5) * 1e-3)
    if task == "classification_multiclass":
        freq = torch.bincount(train_target.long(), minlength=3).float()
        return (freq / freq.sum()).expand(num_samples, 3).clone()
    if task == "regression":
        return torch.zeros(num_samples)
    q = (torch.quantile(train_return.double(), torch.tensor(QUANTILES, dtype=torch.float64)).float()
         - target_mean) / target_std
    return q.expand(num_samples, len(QUANTILES)).clone()
