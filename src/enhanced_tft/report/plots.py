"""The report's figures, each a PNG (bytes) made with matplotlib's object API and the Agg canvas.

No pyplot: figures are not registered in a global list, so nothing stays alive after a plot is
saved (pyplot keeps every figure until it is closed, the leak users of other toolkits report).
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..tasks import SPLIT_STATS

MEMBER_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
MODEL, MEAN_MEMBER, BASELINE = "#1f77b4", "#8fbbe0", "#b0b0b0"
STRONG, BLEND, OTHER = "#2ca02c", "#9467bd", "#ff7f0e"   # LightGBM, the blend, any other forecaster
LOWER_IS_BETTER = {"mae", "rmse", "quantile_loss", "mae_p50", "qlike", "mse_log"}
NOMINAL = {"coverage_p10_p90": 0.8}   # neither higher nor lower: a calibrated P10-P90 band holds 80%


def new_figure(width: float, height: float, **kwargs) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _color(member: int) -> str:
    return MEMBER_COLORS[member % len(MEMBER_COLORS)]


def metrics_bars(rows: list[tuple[str, list[tuple[str, float]]]]) -> bytes:
    """One small panel per metric, a bar per forecaster that has it: [(metric, [(label, value), ...]), ...] with
    the labels the metrics table uses (model or ensemble, mean member, LightGBM, blend, persistence, HAR, naive
    baseline); each keeps its colour in every panel and in the walk-forward figure."""
    palette = {"model": MODEL, "ensemble": MODEL, "mean member": MEAN_MEMBER, "LightGBM": STRONG, "blend": BLEND,
               "persistence": OTHER, "HAR": "#8c564b", "naive baseline": BASELINE}
    width = max(len(bars) for _, bars in rows) if rows else 1
    fig = new_figure((0.6 * width + 0.8) * len(rows) + 0.4, 3.0)
    axes = fig.subplots(1, len(rows), squeeze=False)[0]
    for ax, (name, shown) in zip(axes, rows):
        labels = [label.replace(" ", "\n") for label, _ in shown]
        values = [value for _, value in shown]
        colors = [palette.get(label, OTHER) for label, _ in shown]
        bars = ax.bar(labels, values, color=colors)
        ax.bar_label(bars, fmt="%.4g", fontsize=8, padding=2)
        if name in NOMINAL:
            ax.axhline(NOMINAL[name], color="black", ls="--", lw=1)
            ax.set_title(f"{name} (dashed: nominal {NOMINAL[name]:g})", fontsize=9)
            values = values + [NOMINAL[name]]
        else:
            ax.set_title(f"{name} ({'lower' if name in LOWER_IS_BETTER else 'higher'} is better)", fontsize=9)
        low, high = min(values), max(values)
        pad = (high - low) * 0.35 or abs(high) * 0.1 or 0.1
        ax.set_ylim(max(low - pad, 0.0) if low >= 0 else low - pad, high + pad)
        ax.tick_params(labelsize=8)
    return to_png(fig)


def learning_curves(epochs: pd.DataFrame, windows: pd.DataFrame, val_metric: str | None) -> bytes:
    """Train and validation loss per epoch for each member (logging windows faint); a validation metric beside."""
    fig = new_figure(11, 3.8)
    loss_ax, metric_ax = fig.subplots(1, 2)
    for member, group in epochs.groupby("member"):
        color = _color(int(member))
        loss_ax.plot(group["epoch"], group["loss/train"], "-o", color=color, ms=3, label=f"member {member} train")
        loss_ax.plot(group["epoch"], group["loss/val"], "--s", color=color, ms=3, label=f"member {member} val")
        if val_metric and val_metric in group:
            metric_ax.plot(group["epoch"], group[val_metric], "-o", color=color, ms=3, label=f"member {member}")
    if len(windows):
        for member, group in windows.groupby("member"):
            loss_ax.plot(group["x"], group["loss/train"], color=_color(int(member)), alpha=0.3, lw=1)
    loss_ax.set(xlabel="epoch (faint: train loss per logging window)", ylabel="loss", title="loss")
    loss_ax.legend(fontsize=7, ncol=2)
    if val_metric:
        metric_ax.set(xlabel="epoch", ylabel=val_metric.removeprefix("val/"), title=f"validation {val_metric[4:]}")
        metric_ax.legend(fontsize=7)
    else:
        metric_ax.set_axis_off()
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return to_png(fig)


def memory_over_time(records: pd.DataFrame, series: dict[str, str], member_starts: list[float]) -> bytes:
    """Memory figures of each logging window and epoch end along the run (members one after another)."""
    fig = new_figure(11, 3.6)
    ax = fig.subplots()
    top = max(float(records[key].max()) for key in series)
    unit, divisor = ("GiB", 2**30) if top >= 4 * 2**30 else ("MiB", 2**20)
    styles = ("-o", "--s", ":^", "-.v")
    for (key, label), style in zip(series.items(), styles):
        part = records[["progress", key]].dropna()
        ax.plot(part["progress"], part[key] / divisor, style, ms=3, label=label)
    for start in member_starts[1:]:
        ax.axvline(start, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="training progress in epochs (dotted lines: the next ensemble member starts)", ylabel=unit,
           title="memory over time")
    ax.set_ylim(0, top / divisor * 1.25)   # from zero, with room above the lines for the legend
    ax.set_xlim(left=0)
    ax.legend(fontsize=8, loc="upper left", ncol=len(series))
    ax.grid(alpha=0.3)
    return to_png(fig)


def calibration(prob_columns: dict[str, np.ndarray], labels: np.ndarray, num_bins: int = 10) -> bytes:
    """Reliability: observed frequency against predicted probability in equal-count bins; histogram below."""
    fig = new_figure(11, 4.6)
    curve_ax, hist_ax = fig.subplots(1, 2, width_ratios=(1.2, 1))
    low, high = 1.0, 0.0
    for index, (name, prob) in enumerate(prob_columns.items()):
        outcome = (labels == index).astype(float) if len(prob_columns) > 1 else labels.astype(float)
        order = np.argsort(prob, kind="stable")
        bins = [b for b in np.array_split(order, num_bins) if len(b)]
        predicted = np.array([prob[b].mean() for b in bins])
        observed = np.array([outcome[b].mean() for b in bins])
        error = np.sqrt(observed * (1 - observed) / np.array([len(b) for b in bins]))   # binomial std error
        curve_ax.errorbar(predicted, observed, yerr=error, fmt="-o", ms=4, capsize=2, color=_color(index),
                          label=f"{name} ({len(bins)} bins of {len(bins[0])}, ±1 std error)")
        hist_ax.hist(prob, bins=30, alpha=0.55, color=_color(index), label=name)
        low = min(low, predicted.min(), (observed - error).min())
        high = max(high, predicted.max(), (observed + error).max())
    pad = max((high - low) * 0.1, 0.02)
    low, high = max(low - pad, 0.0), min(high + pad, 1.0)
    curve_ax.plot([low, high], [low, high], color="grey", ls="--", lw=1, label="perfectly calibrated")
    curve_ax.set(xlim=(low, high), ylim=(low, high), xlabel="mean predicted probability (equal-count bins)",
                 ylabel="observed frequency", title="calibration on the test split (ensemble mean)")
    curve_ax.set_aspect("equal")
    curve_ax.legend(fontsize=8)
    curve_ax.grid(alpha=0.3)
    hist_ax.set(xlabel="predicted probability", ylabel="test samples", title="predicted probabilities")
    hist_ax.legend(fontsize=8)
    return to_png(fig)


def variable_importance(frame: pd.DataFrame) -> bytes:
    """Mean selection weight of each variable: past inputs (observed and known) and future (known) inputs."""
    past = frame[frame.selection == "past"].sort_values("importance")
    future = frame[frame.selection == "future"].sort_values("importance")
    fig = new_figure(11, max(3.0, 0.28 * len(past) + 1.2))
    past_ax, future_ax = fig.subplots(1, 2, width_ratios=(1.4, 1))
    kind_color = {"observed": "#1f77b4", "known": "#ff7f0e"}
    for ax, part, title in ((past_ax, past, "past steps: observed + known inputs"),
                            (future_ax, future, "horizon steps: known inputs")):
        bars = ax.barh(part["variable"], part["importance"], color=[kind_color[k] for k in part["kind"]])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        ax.set(xlabel="mean selection weight (sums to 1 per step)", title=title)
        ax.set_xlim(0, part["importance"].max() * 1.18)
        ax.tick_params(axis="y", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    past_ax.legend(handles=[Patch(color=c, label=k) for k, c in kind_color.items()], fontsize=8, loc="lower right")
    return to_png(fig)


def importance_by_symbol(frame: pd.DataFrame) -> bytes:
    """Heatmap of the past-step selection weights: one row per symbol, variables in overall order."""
    past = frame[frame.selection == "past"]
    variables = list(dict.fromkeys(past["variable"]))
    table = past.pivot(index="symbol", columns="variable", values="importance")[variables]
    fig = new_figure(11, max(2.2, 0.35 * len(table) + 1.6))
    ax = fig.subplots()
    image = ax.imshow(table.to_numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(variables)), variables, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(table)), table.index, fontsize=8)
    ax.set_title("past-step selection weight per symbol (columns in overall order)")
    fig.colorbar(image, ax=ax, label="mean selection weight")
    return to_png(fig)


def attention_by_lag(frame: pd.DataFrame) -> bytes:
    """Mean attention of the forecast position over the window, per block."""
    fig = new_figure(11, 3.6)
    ax = fig.subplots()
    for block, group in frame.groupby("block"):
        ax.plot(group["lag"], group["attention"], "-o", ms=3, color=_color(int(block)), label=f"block {block}")
    length = frame["position"].max() + 1
    ax.axhline(1.0 / length, color="grey", ls="--", lw=1, label=f"uniform (1/{length})")
    ax.axvline(-0.5, color="grey", ls=":", lw=1)
    ax.invert_xaxis()   # time runs left to right: oldest bars first, horizon rows last
    ax.set(xlabel="lag: bars before the last observed bar (negative: known rows of the horizon)",
           ylabel="mean attention weight", title="attention of the forecast position by lag (mean over heads)")
    ax.set_ylim(0, frame["attention"].max() * 1.15)
    ax.text(-0.6, frame["attention"].max() * 1.07, " horizon", fontsize=8, color="grey")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return to_png(fig)


def ensemble_spread(metric: str, member_values: list[float], ensemble_value: float,
                    spread: np.ndarray | None, spread_label: str) -> bytes:
    """Members' test metric against the ensemble's; distribution of the members' disagreement per sample."""
    fig = new_figure(11, 3.6)
    members_ax, spread_ax = fig.subplots(1, 2)
    positions = np.arange(len(member_values))
    members_ax.bar(positions, member_values, color=[_color(i) for i in positions])
    members_ax.axhline(ensemble_value, color="black", lw=1.5, label=f"ensemble {ensemble_value:.4g}")
    members_ax.axhline(float(np.mean(member_values)), color="grey", ls="--", lw=1,
                       label=f"mean member {np.mean(member_values):.4g}")
    values = [*member_values, ensemble_value]
    pad = (max(values) - min(values)) * 0.6 or abs(max(values)) * 0.05 or 0.01
    members_ax.set_ylim(min(values) - pad, max(values) + pad)
    members_ax.set_xticks(positions, [f"member {i}" for i in positions], fontsize=8)
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    members_ax.set(ylabel=metric, title=f"test {metric} of each member ({better} is better)")
    members_ax.legend(fontsize=8)
    if spread is not None:
        spread_ax.hist(spread, bins=40, color="#7f7f7f")
        spread_ax.axvline(float(np.median(spread)), color="black", lw=1, label=f"median {np.median(spread):.3g}")
        spread_ax.set(xlabel=spread_label, ylabel="test samples", title="members' disagreement per sample")
        spread_ax.legend(fontsize=8)
    else:
        spread_ax.set_axis_off()
    return to_png(fig)




def walk_forward_figure(summary: dict) -> Figure:
    """One panel per metric: its value in each fold (x) for the model, LightGBM and the naive baseline, with the
    mean over folds as a dashed line of the same colour."""
    folds = summary["folds"]
    keys = [k for k in summary["over_folds"]["model"] if k not in SPLIT_STATS]   # metrics, not what the split holds
    sources = [(n, label, color) for n, label, color in (("model", "model", MODEL), ("strong_baseline", "LightGBM", STRONG),
                                                         ("blend", "blend", BLEND), ("baseline", "naive baseline", BASELINE))
               if n in summary["over_folds"]]
    fig = new_figure(3.0 * len(keys) + 0.4, 3.2)
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    width = 0.8 / len(sources)
    x = np.arange(len(folds))
    field = {"model": "test", "strong_baseline": "strong_baseline", "blend": "blend", "baseline": "baseline"}
    for ax, key in zip(axes, keys):
        shown = []
        for i, (name, label, color) in enumerate(sources):
            values = [(f.get(field[name]) or {}).get(key, np.nan) for f in folds]
            ax.bar(x + (i - (len(sources) - 1) / 2) * width, values, width, color=color, label=label)
            shown += [v for v in values if v is not None and np.isfinite(v)]
            mean = summary["over_folds"][name][key]["mean"]
            if mean is not None:
                ax.axhline(mean, color=color, ls="--", lw=1)
        if shown:   # the differences, not the distance from zero
            low, high = min(shown), max(shown)
            pad = (high - low) * 0.35 or abs(high) * 0.1 or 0.1
            ax.set_ylim(max(low - pad, 0.0) if low >= 0 else low - pad, high + pad)
        ax.set_xticks(x, [f"fold {f['fold']}" for f in folds])
        ax.set_title(f"{key} ({'lower' if key in LOWER_IS_BETTER else 'higher'} is better)", fontsize=9)
        ax.tick_params(labelsize=8)
    # below the panels, where no bar is
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(sources), fontsize=8)
    fig.suptitle("walk-forward test metrics per fold (dashed: mean over folds)", fontsize=10)
    return fig
