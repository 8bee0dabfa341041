"""The linear skip fitted before the body trains (model.linear_skip): the model starts as the linear rule on the
last bar's inputs, the best such rule for the task's own loss on the train split, and its body (whose read-out
starts at zero) learns only what that rule leaves.

Why: on noisy targets a few thousand AdamW steps bring the skip near that rule only while the body fits noise
beside it; fitted first, by L-BFGS on at most MAX_ROWS train samples (a second on the CPU), it is exact from the
first step (docs/performance.md has the measurements). A resumed member never refits: its checkpoint holds the
skip it trained.

Legend: N samples, F observed variables, O outputs.
"""
from __future__ import annotations

import math

import torch

from ..data.windows import WindowSet
from ..model.tft import EnhancedTFT
from ..tasks import Task

MAX_ROWS = 200_000        # samples the linear fit reads (evenly spaced over the split when it has more)
MAX_ITERATIONS = 100      # L-BFGS iterations (strong Wolfe line search); converged well before on every task


def last_bar_inputs(split: WindowSet, max_rows: int = MAX_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """The last bar's observed inputs (N, F) of the split's samples, as the model sees them, and their targets (N,):
    the rows of the samples' last bars, read straight from the series arrays (no window is gathered)."""
    ends = split.sample_ends
    if len(ends) > max_rows:
        ends = ends[torch.linspace(0, len(ends) - 1, max_rows).round().long()]
    return split.arrays.observed.index_select(0, ends).float(), split.arrays.target.index_select(0, ends)


def fit_linear_skip(skip: torch.nn.Module, task: Task, inputs_NF: torch.Tensor,
                    target_N: torch.Tensor) -> tuple[dict[str, torch.Tensor], float, float]:
    """Fit `skip` (the model's OutputHead of the last bar's inputs) alone to the task's loss; returns its weights
    (CPU tensors) and the mean train loss before and after. Where the loss is not finite, or the fit fails or
    ends worse than it began, the skip keeps the weights it had (after == before): the trainer's own NaN/inf
    handling then speaks for the run."""
    initial = {k: v.detach().to("cpu", copy=True) for k, v in skip.state_dict().items()}
    optimizer = torch.optim.LBFGS(skip.parameters(), max_iter=MAX_ITERATIONS, line_search_fn="strong_wolfe")

    def mean_loss() -> torch.Tensor:
        return task.loss(skip(inputs_NF), target_N).mean()

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = mean_loss()
        loss.backward()
        return loss

    with torch.no_grad():
        before = float(mean_loss())
    if not math.isfinite(before):
        return initial, before, before
    try:
        optimizer.step(closure)
    except RuntimeError:   # a step that overflowed (extreme inputs): keep the initial weights
        skip.load_state_dict(initial)
    skip.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = float(mean_loss())
    if not math.isfinite(after) or after > before:
        skip.load_state_dict(initial)
        return initial, before, before
    return {k: v.detach().to("cpu", copy=True) for k, v in skip.state_dict().items()}, before, after


def start_from_linear_rule(model: EnhancedTFT, task: Task, split: WindowSet, device: torch.device,
                           fit=None) -> tuple[float, float]:
    """Zero the body's read-out and give the skip the fitted linear rule (`fit` runs the fit and returns what
    fit_linear_skip does: under torchrun, rank 0's fit given to every rank). Returns the losses before and after."""
    def local_fit():
        inputs, target = last_bar_inputs(split)
        return fit_linear_skip(model.skip, task, inputs.to(device), target.to(device))

    with torch.no_grad():
        model.head.linear.weight.zero_()
        model.head.linear.bias.zero_()
    weights, before, after = (fit or (lambda work: work()))(local_fit)
    model.skip.load_state_dict(weights)
    return before, after
