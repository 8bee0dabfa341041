"""The read-out head: a linear map of the last position's state, run in float32 whatever the autocast
precision of the body. What the outputs mean (loss, prediction) is the task's business (tasks.py)."""
from __future__ import annotations

import torch
from torch import nn


class OutputHead(nn.Module):
    """Linear read-out (B, D) -> (B, O) in float32."""

    def __init__(self, d_model: int, output_size: int):
        super().__init__()
        self.linear = nn.Linear(d_model, output_size)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=state.device.type, enabled=False):
            return self.linear(state.float())
