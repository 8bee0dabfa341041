"""Task heads and losses. Both run in float32 whatever the autocast precision of the body."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTILES = (0.1, 0.5, 0.9)
OUTPUT_SIZE = {"regression": 1, "quantile": len(QUANTILES), "classification_binary": 1,
               "classification_multiclass": 3}


class TaskHead(nn.Module):
    """Linear read-out of the last position's state, computed in float32."""

    def __init__(self, task: str, d_model: int, regression_loss: str = "huber", huber_delta: float = 1.0):
        super().__init__()
        self.task = task
        self.regression_loss = regression_loss
        self.huber_delta = huber_delta
        self.linear = nn.Linear(d_model, OUTPUT_SIZE[task])
        self.register_buffer("quantiles", torch.tensor(QUANTILES), persistent=False)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        """state: (B, D) -> raw output (B, O) in float32."""
        with torch.autocast(device_type=state.device.type, enabled=False):
            return self.linear(state.float())

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (B,) in float32; the trainer sums and normalises them."""
        output = output.float()
        if self.task == "regression":
            pred = output[:, 0]
            if self.regression_loss == "mae":
                return (pred - target).abs()
            return F.huber_loss(pred, target, reduction="none", delta=self.huber_delta)
        if self.task == "quantile":
            error = target.unsqueeze(1) - output                                    # (B, Q)
            return torch.maximum(self.quantiles * error, (self.quantiles - 1) * error).mean(dim=1)
        if self.task == "classification_binary":
            return F.binary_cross_entropy_with_logits(output[:, 0], target, reduction="none")
        return F.cross_entropy(output, target.long(), reduction="none")

    def predict(self, output: torch.Tensor) -> torch.Tensor:
        """Raw output -> what users read: value(s) in target units, P(up), or class probabilities."""
        output = output.float()
        if self.task == "regression":
            return output[:, 0]
        if self.task == "quantile":
            return output.sort(dim=1).values   # keeps P10 <= P50 <= P90
        if self.task == "classification_binary":
            return torch.sigmoid(output[:, 0])
        return torch.softmax(output, dim=1)
