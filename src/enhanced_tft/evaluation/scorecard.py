"""Scoring members against the naive baseline: one function for summary.json after training and for
`etft evaluate` afterwards, and one table for the console after both."""
from __future__ import annotations

import logging

import numpy as np
import torch

from ..data.tables import table_batches
from ..tasks import SPLIT_STATS, TargetScale, Task, ensemble_mean, member_stack
from .quant import backtest, format_quant, quant_metrics, signal_of
from .volatility import tested as volatility_tested

log = logging.getLogger(__name__)


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
    ensemble = task.metrics(torch.from_numpy(ensemble_mean(member_stack(member_predictions))), target, raw, scale)
    constant = torch.tensor(baseline, dtype=torch.float32)
    repeated = constant.expand(len(target), *constant.shape).clone()
    return {"test": ensemble, "members": members, "mean_member": mean_of(members, ensemble),
            "baseline": task.metrics(repeated, target, raw, scale)}


def metrics_table(task: Task, test: dict, baseline: dict, rule: str, mean_member: dict | None, title: str,
                  strong: dict | None = None, blend: dict | None = None,
                  others: list[tuple[str, dict]] = ()) -> str:
    """The console table: model (or ensemble), mean member when there are several, LightGBM when fitted, the blend
    of the two (`blend`: summary.json's record), the other baselines (`others`: the volatility target's persistence
    and HAR), the naive baseline; then the rules and what the split itself looks like."""
    keys = [k for k in test if k not in SPLIT_STATS and k in baseline]
    label = "ensemble" if mean_member else "model"
    columns = [(label, test, 12)] + ([("mean member", mean_member, 14)] if mean_member else [])
    columns += ([("LightGBM", strong, 12)] if strong else []) + ([("blend", blend["test"], 12)] if blend else [])
    columns += [(name, values, 12) for name, values in others]
    columns += [("baseline", baseline, 12)]
    lines = [title, f"  {'metric':<20}" + "".join(f"{name:>{width}}" for name, _, width in columns)]
    lines += [f"  {k:<20}" + "".join(f"{values[k]:>{width}.4f}" if k in values else f"{'-':>{width}}"
                                     for _, values, width in columns) for k in keys]
    lines.append(f"baseline: {rule}")
    if blend:
        lines.append(f"blend: {blend['weight_model']:.2f} x {label} + {blend['weight_strong_baseline']:.2f} x LightGBM, "
                     "the weight fitted on the val split")
    note = task.split_note(test)
    if note:
        lines.append(f"class balance: {note}")
    return "\n".join(lines)


def scorecard_table(task: Task, card: dict, title: str, rule: str, strong: dict | None = None,
                    blend: dict | None = None) -> str:
    """The console lines of a scorecard (summary.json's after training, `etft evaluate`'s after): the metrics
    table, then the quant lines when the card has them. `strong`: LightGBM's metrics on the same samples;
    `blend`: the blend's record (weight and test metrics)."""
    several = card["ensemble"]["size"] > 1
    lines = [metrics_table(task, card["test"], card["baseline"], rule,
                           card["ensemble"]["mean_member"] if several else None, title, strong, blend,
                           volatility_tested(card))]
    if "quant" in card:
        lines.append(format_quant(card["quant"]["model"], card["quant"].get("strong_baseline"),
                                  card["quant"].get("blend")))
    return "\n".join(lines)


def prediction_frame(windows, transform, member_predictions: list[torch.Tensor],
                     target_known: np.ndarray | None = None):
    """The rows `etft predict` writes (where, what followed, the task's columns, no per-member columns) for
    predictions already in memory: what the quant metrics read."""
    import pandas as pd

    (columns,) = table_batches(windows.arrays.rows(), windows.sample_ends.numpy(), target_known, transform,
                               [(windows.all_indices(), member_predictions)], with_members=False)
    return pd.DataFrame(columns)


def quant_of(cfg, transform, windows, member_predictions: list[torch.Tensor],
             target_known: np.ndarray | None = None) -> dict | None:
    """IC, rank IC and backtests of predictions (quant.quant_metrics) with the config's costs; None where they do
    not apply (a volatility forecast has no direction, a task without a direction score, data without time)."""
    if transform.target != "return" or windows.arrays.timestamp is None:
        return None
    frame = prediction_frame(windows, transform, member_predictions, target_known)
    try:
        return quant_metrics(frame, transform.task, cost_bps=cfg.backtest.cost_bps,
                             periods_per_year=cfg.backtest.periods_per_year, horizon=transform.horizon,
                             quantile=cfg.backtest.quantile)
    except ValueError as err:   # a task whose outputs give no direction score
        log.info("quant metrics skipped: %s", err)
        return None


def equity_curves(cfg, transform, windows, predictions: dict[str, list[torch.Tensor]]):
    """Equity of the long/short-by-sign backtest of each named prediction set, net of costs, beside the
    equal-weight long of the same symbols: one column each, indexed by the timestamp a position is taken at."""
    import pandas as pd

    columns = {}
    for name, members in predictions.items():
        frame = prediction_frame(windows, transform, members)
        result = backtest(frame, signal_of(frame, transform.task), mode="sign", cost_bps=cfg.backtest.cost_bps,
                          periods_per_year=cfg.backtest.periods_per_year, horizon=transform.horizon)
        columns[name] = result.strategy.equity
        benchmark = result.benchmark.equity
    curves = pd.DataFrame({**columns, "equal-weight long": benchmark})
    curves.index.name = "timestamp"
    return curves
