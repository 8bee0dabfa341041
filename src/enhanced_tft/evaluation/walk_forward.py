"""Walk-forward results side by side: each fold's test numbers (model, naive rule, LightGBM, blend, the quant
figures), and their mean and standard deviation over the folds; the console table. training.recipe.walk_forward
trains the folds; report.plots.walk_forward_figure draws them."""
from __future__ import annotations

import statistics
from pathlib import Path

from .. import tasks
from ..runs import SUMMARY_JSON, RunFolder
from .volatility import LABELS as VOLATILITY_BASELINES


def fold_record(fold: int, run_path: Path) -> dict:
    """One fold's test numbers for the comparison: model, naive rule, LightGBM, the sign backtest's Sharpe."""
    summary = RunFolder(run_path).read_json(SUMMARY_JSON)
    record = {"fold": fold, "run": str(run_path), "test": summary["test"],
              "baseline": {k: v for k, v in summary["baseline"].items() if k not in ("rule", "output")},
              "strong_baseline": summary.get("strong_baseline", {}).get("test"),
              "blend": summary.get("blend", {}).get("test")}
    for name, found in summary.get("volatility_baselines", {}).items():   # persistence and HAR (volatility target)
        record[name] = found["test"]
    quant = summary.get("quant")
    if quant:
        record["quant"] = {name: {"rank_ic": ((q["information_coefficient"]["cross_sectional"] or {}).get("rank")
                                              or {}).get("mean"),
                                  "time_series_rank_ic": q["information_coefficient"]["time_series"].get("mean_rank"),
                                  "sharpe_sign": q["backtest"]["sign"].get("sharpe"),
                                  "total_return_sign": q["backtest"]["sign"].get("total_return")}
                           for name, q in quant.items() if q}
    return record


def _mean_sd(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "folds": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "folds": len(values)}


def walk_forward_summary(results: list[dict]) -> dict:
    """Per fold, and mean and standard deviation over the folds of every metric: the model, the naive
    baseline and LightGBM (where fitted), and the quant numbers (rank IC, the sign backtest's Sharpe)."""
    keys = [k for k, v in results[0]["test"].items() if isinstance(v, float)]
    compared = {"model": [r["test"] for r in results], "baseline": [r["baseline"] for r in results]}
    for name in ("strong_baseline", "blend", *VOLATILITY_BASELINES):
        if all(r.get(name) for r in results):
            compared[name] = [r[name] for r in results]
    over_folds = {name: {k: _mean_sd([m.get(k) for m in metrics]) for k in keys}
                  for name, metrics in compared.items()}
    quant = {}
    for name in ("model", "strong_baseline", "blend"):
        rows = [r.get("quant", {}).get(name) for r in results]
        if all(rows):
            quant[name] = {k: _mean_sd([row[k] for row in rows]) for k in rows[0]}
    return {"folds": results, "mean": {k: v["mean"] for k, v in over_folds["model"].items()},
            "over_folds": over_folds, "quant_over_folds": quant}


def format_walk_forward(summary: dict) -> str:
    """The console table: each metric's mean +- sd over the folds, model beside LightGBM and the naive rule."""
    folds = summary["folds"]
    names = [n for n in ("model", "strong_baseline", "blend", *VOLATILITY_BASELINES, "baseline")
             if n in summary["over_folds"]]
    labels = {"model": "model", "strong_baseline": "LightGBM", "blend": "blend", "baseline": "naive baseline",
              **VOLATILITY_BASELINES}
    lines = [f"walk-forward test metrics ({len(folds)} folds), mean +- sd over folds:",
             f"  {'metric':<20}" + "".join(f"{labels[n]:>24}" for n in names)]
    for key in summary["over_folds"]["model"]:
        if key in tasks.SPLIT_STATS:   # what the split holds, the same for every column
            continue
        cells = [summary["over_folds"][n][key] for n in names]
        lines.append(f"  {key:<20}" + "".join(f"{c['mean']:>14.4f} +- {c['sd']:<6.4f}" if c["mean"] is not None
                                              else f"{'-':>24}" for c in cells))
    for name, stats in summary["quant_over_folds"].items():
        parts = [_shown("rank IC across symbols", stats["rank_ic"], "+.4f", "n/a with one symbol"),
                 _shown("rank IC over time", stats.get("time_series_rank_ic"), "+.4f", "n/a"),
                 _shown("Sharpe (sign, net of costs)", stats["sharpe_sign"], "+.2f", "n/a")]
        lines.append(f"  {labels[name]}: " + ", ".join(parts))
    lines.append("  per fold: " + "; ".join(f"fold {r['fold']} {r['run']}" for r in folds))
    return "\n".join(lines)


def _shown(label: str, stats: dict | None, spec: str, missing: str) -> str:
    """`label mean +- sd`, or why there is none (a cross-sectional IC of one symbol is undefined, not zero)."""
    if not stats or stats["mean"] is None:
        return f"{label} {missing}"
    return f"{label} {format(stats['mean'], spec)} +- {format(stats['sd'], spec.lstrip('+'))}"
