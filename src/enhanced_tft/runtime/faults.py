"""Named points where a test injects a failure into a real run (an out-of-memory, a killed process): before each
training micro-batch's forward and each inference or evaluation chunk. A test fixture sets `hook`
(tests/conftest.py: inject_faults); in production it is None and a point costs one attribute read."""
from __future__ import annotations

from typing import Callable

import torch

# hook(phase, step, index, indices): phase "train" or the chunk loop's name ("val", "test", "prediction", ...),
# step the optimizer step (training's micro-batches; 0 elsewhere), index the micro-batch or chunk's position
hook: Callable[[str, int, int, torch.Tensor], None] | None = None


def point(phase: str, step: int, index: int, indices: torch.Tensor) -> None:
    if hook is not None:
        hook(phase, step, index, indices)
