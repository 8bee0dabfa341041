"""What a run must remember to continue exactly where it stopped: the epoch loop's counters and the RNG states."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class TrainProgress:
    """Counters of the epoch loop; saved in every checkpoint as plain numbers and tensors."""
    epoch: int = 1                  # the epoch being trained (1-based)
    step_in_epoch: int = 0          # optimizer steps already done in it
    epoch_loss_sum: float = 0.0
    epoch_samples: int = 0
    epoch_seconds: float = 0.0
    best_loss: float = float("inf")
    best_epoch: int = 0
    stale_epochs: int = 0
    total_samples: int = 0
    total_seconds: float = 0.0
    peak_bytes: int = 0
    epochs_done: int = 0
    stopped_early: bool = False
    nonfinite_in_a_row: int = 0
    nonfinite_steps: int = 0
    order_state: torch.Tensor | None = field(default=None, repr=False)   # data-order RNG at the epoch's start

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, 0
        self.epoch_loss_sum, self.epoch_samples, self.epoch_seconds = 0.0, 0, 0.0
        self.order_state = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainProgress":
        return cls(**values)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
