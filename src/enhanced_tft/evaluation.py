"""Scoring members against the naive baseline: one function for summary.json after training and for
`etft evaluate` afterwards, and one table for the console after both."""
from __future__ import annotations

import torch

from .tasks import SPLIT_STATS, Task, TargetScale


def mean_of(records: list[dict[str, float]], keys) -> dict[str, float]:
    """The mean member: each metric averaged over the members' own metrics."""
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


def baseline_output(task: Task, train_target: torch.Tensor, train_raw: torch.Tensor, scale: TargetScale) -> list:
    """The naive rule's constant output fitted on the train split, as summary.json keeps it (`etft evaluate`
    applies the saved value, so a run is scored against the rule it was trained beside)."""
    return task.baseline(train_target, train_raw, scale).tolist()


def score(task: Task, member_predictions: list[torch.Tensor], target: torch.Tensor, raw: torch.Tensor,
          scale: TargetScale, baseline: list | float) -> dict:
    """Metrics of each member, of the ensemble (mean of member predictions), of the mean member and of the
    baseline's constant output, all on the same samples."""
    members = [task.metrics(p, target, raw, scale) for p in member_predictions]
    ensemble = task.metrics(torch.stack(member_predictions).mean(dim=0), target, raw, scale)
    constant = torch.tensor(baseline, dtype=torch.float32)
    repeated = constant.expand(len(target), *constant.shape).clone()
    return {"test": ensemble, "members": members, "mean_member": mean_of(members, ensemble),
            "baseline": task.metrics(repeated, target, raw, scale)}


def metrics_table(task: Task, test: dict, baseline: dict, rule: str, mean_member: dict | None, title: str) -> str:
    """The console table: model (or ensemble), mean member when there are several, baseline; then the rule and
    what the split itself looks like."""
    keys = [k for k in test if k not in SPLIT_STATS and k in baseline]
    label = "ensemble" if mean_member else "model"
    lines = [title, f"  {'metric':<20}{label:>12}" + (f"{'mean member':>14}" if mean_member else "") + f"{'baseline':>12}"]
    lines += [f"  {k:<20}{test[k]:>12.4f}" + (f"{mean_member[k]:>14.4f}" if mean_member else "") + f"{baseline[k]:>12.4f}"
              for k in keys]
    lines.append(f"baseline: {rule}")
    note = task.split_note(test)
    if note:
        lines.append(f"class balance: {note}")
    return "\n".join(lines)
