"""Run folder -> report.html: one self-contained page (figures embedded as base64 PNG) built from the files
that training leaves: summary.json, config.yaml, metrics.jsonl, scaler.json, the interpretation CSVs and
predictions_test.csv. A missing file leaves its section saying so; only summary.json is required."""
from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import pandas as pd

from .. import tasks
from ..errors import UserError
from ..evaluation import volatility
from ..evaluation.quant import span_of, span_text
from ..evaluation.scorecard import mean_of
from ..runs import (ATTENTION_CSV, BACKTEST_CSV, CONFIG_YAML, IMPORTANCE_BY_SYMBOL_CSV, IMPORTANCE_CSV,
                    PREDICTIONS_TEST_CSV, REPORT_HTML, SCALER_JSON, SUMMARY_JSON, RunFolder)
from . import plots
from .quant_plots import equity_curve_png

log = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px auto; max-width: 1140px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 28px; }
table { border-collapse: collapse; font-size: 14px; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 10px; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; } .kv td { text-align: left; }
img { max-width: 100%; } .note { color: #666; font-size: 13px; } pre { background: #f7f7f7; padding: 8px; font-size: 12px; }
"""


class RunFiles:
    """What a report reads from a run folder, each file optional except summary.json."""

    def __init__(self, path: Path):
        self.folder = RunFolder(path)
        self.path = self.folder.path
        if self.folder.missing(SUMMARY_JSON):
            raise UserError(f"--run {str(self.path)!r} has no {SUMMARY_JSON}: not a finished run folder "
                              "(a folder like logs/training_20261128_101500)")
        self.summary = self.folder.read_json(SUMMARY_JSON)
        self.task = tasks.REGISTRY.get(self.summary.get("task"))   # None: a task this version does not know

    def text(self, name: str) -> str | None:
        return self.folder.read_text(name)

    def csv(self, name: str) -> pd.DataFrame | None:
        file = self.folder.file(name)
        return pd.read_csv(file) if file.is_file() else None

    def metrics(self) -> pd.DataFrame:
        return pd.DataFrame(self.folder.metrics_records())


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _cell(value) -> str:
    if isinstance(value, float):   # small losses keep 4 significant digits, not 4 decimals
        return f"{value:.4f}" if value == 0 or abs(value) >= 0.01 else f"{value:.4g}"
    return html.escape(str(value))


def html_table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def key_values_table(rows: list[list]) -> str:
    """A two-column table of names and values, left-aligned, without a header row."""
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>" for k, v in rows)
    return '<table class="kv">' + body + "</table>"


def note_paragraph(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _mean_member(summary: dict) -> dict[str, float]:
    members = summary.get("ensemble", {}).get("members", [])
    return mean_of([m["test"] for m in members], members[0]["test"]) if len(members) > 1 else {}


def section_overview(run: RunFiles) -> str:
    s = run.summary
    rows = [["task", s.get("task")], ["status", s.get("status")], ["device", s.get("device", "?")],
            ["precision", f"{s.get('precision', {}).get('name', '?')}: {s.get('precision', {}).get('reason', '')}"],
            ["ensemble members", s.get("ensemble", {}).get("size", "?")],
            ["effective batch", s.get("effective_batch_size", "?")]]
    if "samples_per_s" in s:
        rows += [["train speed", f"{s['samples_per_s']:.0f} samples/s"],
                 ["peak memory", f"{s['peak_memory_bytes'] / 2**20:.0f} MiB"],
                 ["wall time", f"{s['wall_time_s']:.0f} s"]]
    if s.get("status") != "completed":
        rows.append(["error", s.get("error", "")])
    return "<h2>Run</h2>" + key_values_table(rows)


def section_data(run: RunFiles) -> str:
    data = run.summary.get("data")
    if not data:
        return "<h2>Data</h2>" + note_paragraph("summary.json holds no data summary.")
    samples = data["samples"]
    rows = [["source", data["source"]], ["symbols", data["symbols"]],
            ["samples (windows)", ", ".join(f"{k} {v:,}" for k, v in samples.items())],
            ["observed features", ", ".join(data["observed_features"])],
            ["known features", ", ".join(data["known_features"])]]
    scaler = json.loads(run.text(SCALER_JSON) or "{}")
    if scaler.get("target_log"):   # the model learns log volatility, centred on its train mean
        rows.append(["train mean of the target (log forward realized volatility)", f"{scaler['target_mean']:.6f}"])
    elif "target_std" in scaler:
        target = "forward realized volatility" if data.get("target") == "volatility" else "forward log return"
        rows.append([f"train std of the target ({target})", f"{scaler['target_std']:.6f}"])
    rows += [list(row) for row in (run.task().data_notes(scaler) if run.task else [])]
    return "<h2>Data</h2>" + key_values_table(rows)


def section_metrics(run: RunFiles) -> str:
    s = run.summary
    if "test" not in s:
        return "<h2>Test metrics</h2>" + note_paragraph("no test metrics: the run did not finish.")
    test, baseline, mean_member = s["test"], s["baseline"], _mean_member(s)
    keys = [k for k in test if k not in tasks.SPLIT_STATS and k in baseline]
    label = "ensemble" if s["ensemble"]["size"] > 1 else "model"
    strong = s.get("strong_baseline", {}).get("test", {})
    blend = s.get("blend", {}).get("test", {})
    others = volatility.tested(s)   # persistence and HAR beside a volatility forecaster
    header = (["metric", label] + (["mean member"] if mean_member else []) + (["LightGBM"] if strong else [])
              + (["blend"] if blend else []) + [name for name, _ in others] + ["naive baseline"])
    rows = [[k, test[k]] + ([mean_member[k]] if mean_member else []) + ([strong.get(k, "-")] if strong else [])
            + ([blend.get(k, "-")] if blend else []) + [values.get(k, "-") for _, values in others] + [baseline[k]]
            for k in keys]
    sources = ([(label, test)] + ([("mean member", mean_member)] if mean_member else []) + [("LightGBM", strong),
               ("blend", blend)] + list(others) + [("naive baseline", baseline)])
    png = plots.metrics_bars([(k, [(name, values[k]) for name, values in sources
                                   if isinstance(values.get(k), (int, float))]) for k in keys])
    text = f"{test['num_samples']:,} test samples; baseline: {baseline['rule']}."
    for found in (s.get("volatility_baselines") or {}).values():
        text += f" {found['rule'][0].upper()}{found['rule'][1:]}."
    if strong:
        text += f" Strong baseline: {s['strong_baseline'].get('rule', 'LightGBM')}."
    if blend:
        text += (f" Blend: {s['blend']['weight_model']:.2f} x {label} + {s['blend']['weight_strong_baseline']:.2f} x "
                 "LightGBM, the weight fitted on the val split.")
    elif "strong_baseline" in s:
        text += f" LightGBM: {s['strong_baseline'].get('skipped') or s['strong_baseline'].get('error')}"
    note = run.task().split_note(test) if run.task else ""
    if note:
        text += f" Test split: {note}."
    return "<h2>Test metrics</h2>" + note_paragraph(text) + html_table(header, rows) + img_tag(png, "test metrics")


def section_quant(run: RunFiles) -> str:
    """IC, rank IC and backtests of the model beside LightGBM (summary.json's `quant`) and the equity curves of
    backtest_test.csv."""
    quant = run.summary.get("quant")
    if not quant:
        return ""
    sources = [("model", quant["model"])] + [(label, quant[key]) for key, label in
                                             (("strong_baseline", "LightGBM"), ("blend", "blend")) if quant.get(key)]
    ic_rows = []
    for name, q in sources:
        cross = q["information_coefficient"]["cross_sectional"]
        series = q["information_coefficient"]["time_series"]
        for kind in ("pearson", "rank"):
            stats = (cross or {}).get(kind) or {}
            ic_rows.append([f"{name}: {'IC' if kind == 'pearson' else 'rank IC'}", stats.get("mean", "-"),
                            stats.get("std", "-"), stats.get("icir", "-"), stats.get("share_positive", "-"),
                            series.get("mean_pearson" if kind == "pearson" else "mean_rank", "-")])
    settings = quant["model"].get("settings", {})
    days = span_of(quant["model"])
    span = span_text(days) if days is not None else "over the test split"
    backtests = [(f"{name}: {strategy}", r) for name, q in sources for strategy, r in q["backtest"].items()
                 if "skipped" not in r]
    if quant["model"].get("benchmark"):
        backtests.append(("equal-weight long", quant["model"]["benchmark"]))
    annualised = any(r.get("annualised_return") is not None for _, r in backtests)
    columns = [(f"return {span}", "total_return")] + ([("annualised return", "annualised_return")] if annualised
                                                        else []) + [
        ("volatility (ann.)", "annualised_volatility"), ("Sharpe (ann.)", "sharpe"), ("costs (bps)", "cost_bps"),
        ("turnover / period", "turnover_per_period"), ("costs paid", "costs_total"), ("max drawdown", "max_drawdown"),
        ("hit rate", "hit_rate")]
    def cell(r: dict, key: str):
        value = r.get(key)
        return "-" if value is None else f"{value:g}" if key == "cost_bps" else value

    rows = [[label] + [cell(r, k) for _, k in columns] for label, r in backtests]
    periods_per_year = settings.get("periods_per_year", 0)
    out = ("<h2>Signal and backtest (test split)</h2>" + note_paragraph(
        f"Signal: {quant['model']['signal']}. IC per timestamp across symbols (mean, std, ICIR = mean / std, share "
        "of timestamps with a positive IC); time-series IC: per symbol over time, mean over symbols.")
        + html_table(["", "mean", "std", "ICIR", "positive", "time-series"], ic_rows)
        + note_paragraph(
            f"Backtests {span}, net of {settings.get('cost_bps', float('nan')):g} bps per unit of turnover (turnover = "
            f"sum of |weight change| per period; costs paid: their sum over the span, a share of capital), "
            f"{periods_per_year:,.0f} periods a year, positions held {settings.get('horizon', 1)} bar(s); returns are "
            f"simple. Sharpe and volatility are annualised: mean / std of the net period returns x sqrt("
            f"{periods_per_year:,.0f}). " + ("Returns are annualised over the span's years." if annualised else
                                             "The span is under a year: its own return is shown, not one compounded "
                                             "to a year."))
        + html_table(["strategy"] + [h for h, _ in columns], rows))
    curves = run.csv(BACKTEST_CSV)
    if curves is not None and "timestamp" in curves:
        curves["timestamp"] = pd.to_datetime(curves["timestamp"])
        series = {c: curves.set_index("timestamp")[c] for c in curves.columns if c != "timestamp"}
        title = f"long/short by sign, growth of 1 net of {settings.get('cost_bps', float('nan')):g} bps costs, {span}"
        out += img_tag(equity_curve_png(series, title), "equity curves")
    return out


def _place(metrics: pd.DataFrame, summary: dict) -> tuple[pd.Series, pd.Series, list[float]]:
    """Each record's place in epochs, within its member's run and along the whole run (members in turn);
    and where each member starts along the run."""
    members = {m["member"]: m for m in summary.get("ensemble", {}).get("members", [])}
    offsets, offset = {}, 0.0
    for member in sorted(metrics["member"].unique()):
        offsets[member] = offset
        offset += members.get(member, {}).get("epochs_run") or metrics.loc[metrics.member == member, "epoch"].max()
    within = metrics["epoch"].astype(float)
    if "step" in metrics:   # a logging window sits at its step's share of the epoch
        steps = {k: m["optimizer_steps"] / max(m["epochs_run"], 1) for k, m in members.items()}
        per_epoch = metrics["member"].map(steps).fillna(metrics["step"].max() + 1)
        within = within.where(metrics["kind"] != "window", metrics["epoch"] - 1 + metrics["step"] / per_epoch)
    return within, metrics["member"].map(offsets) + within, list(offsets.values())


def section_training(run: RunFiles) -> str:
    metrics = run.metrics()
    if metrics.empty or "kind" not in metrics:
        return "<h2>Training</h2>" + note_paragraph("metrics.jsonl is missing or empty.")
    metrics["x"], metrics["progress"], member_starts = _place(metrics, run.summary)
    epochs = metrics[metrics.kind == "epoch"]
    windows = metrics[metrics.kind == "window"]
    val_metric = f"val/{run.task.main_metric if run.task else ''}"
    out = "<h2>Learning curves</h2>" + img_tag(plots.learning_curves(
        epochs, windows, val_metric if val_metric in epochs else None), "learning curves")
    series = {"memory/peak_allocated_bytes": "peak allocated (CUDA)", "memory/peak_reserved_bytes": "peak reserved (CUDA)",
              "memory/device_used_bytes": "device used (NVML)", "memory/rss_bytes": "process RSS",
              "memory/peak_rss_bytes": "peak process RSS"}
    series = {k: v for k, v in series.items() if k in metrics and metrics[k].notna().any()}
    if series:
        out += "<h2>Memory over time</h2>" + img_tag(plots.memory_over_time(metrics, series, member_starts), "memory over time")
        out += note_paragraph("Read at each logging window and at each epoch end (after validation).")
    return out


def section_calibration(run: RunFiles, predictions: pd.DataFrame | None) -> str:
    if run.task is None or not run.task.probabilities:
        return ""
    columns = run.task.columns
    if predictions is None:
        return "<h2>Calibration</h2>" + note_paragraph(f"{PREDICTIONS_TEST_CSV} is missing.")
    png = plots.calibration({c: predictions[c].to_numpy() for c in columns}, predictions["label"].to_numpy())
    return ("<h2>Calibration</h2>" + img_tag(png, "calibration")
            + note_paragraph("Each point: one tenth of the test samples, sorted by predicted probability; on the dashed "
                    "line the predicted probability is the observed frequency."))


def section_interpretation(run: RunFiles) -> str:
    out = "<h2>Variable importance</h2>"
    importance = run.csv(IMPORTANCE_CSV)
    if importance is None:
        out += note_paragraph(f"{IMPORTANCE_CSV} is missing.")
    else:
        out += img_tag(plots.variable_importance(importance), "variable importance")
        out += note_paragraph("Mean softmax weight the variable selection networks give each input on the test split, "
                     "averaged over samples and members.")
        by_symbol = run.csv(IMPORTANCE_BY_SYMBOL_CSV)
        if by_symbol is not None and by_symbol["symbol"].nunique() <= 60:
            out += img_tag(plots.importance_by_symbol(by_symbol), "variable importance by symbol")
    out += "<h2>Attention by lag</h2>"
    attention = run.csv(ATTENTION_CSV)
    if attention is None:
        return out + note_paragraph(f"{ATTENTION_CSV} is missing.")
    out += img_tag(plots.attention_by_lag(attention), "attention by lag")
    return out + note_paragraph("Attention weights of the position the head reads (the last of the horizon) over the "
                       "window, mean over heads, test samples and members.")


def section_ensemble(run: RunFiles, predictions: pd.DataFrame | None) -> str:
    s = run.summary
    members = s.get("ensemble", {}).get("members", [])
    if len(members) < 2 or "test" not in s or run.task is None:
        return "<h2>Ensemble</h2>" + note_paragraph("One member: no ensemble spread (train with --ensemble_size N).")
    metric = run.task.main_metric
    column, label = run.task.spread
    spread = predictions[column].to_numpy() if predictions is not None and column in predictions else None
    png = plots.ensemble_spread(metric, [m["test"][metric] for m in members], s["test"][metric], spread, label)
    keys = [k for k in s["test"] if k not in tasks.SPLIT_STATS]
    rows = [[f"member {m['member']} (seed {m['seed']})"] + [m["test"][k] for k in keys] for m in members]
    rows.append(["ensemble (mean of member predictions)"] + [s["test"][k] for k in keys])
    return "<h2>Ensemble</h2>" + html_table(["", *keys], rows) + img_tag(png, "ensemble spread")


def section_config(run: RunFiles) -> str:
    text = run.text(CONFIG_YAML)
    if text is None:
        return "<h2>Config</h2>" + note_paragraph(f"{CONFIG_YAML} is missing.")
    text = _relative_paths(text, run.path)
    return f"<h2>Config</h2><details><summary>config.yaml (what ran)</summary><pre>{html.escape(text)}</pre></details>"


def _relative_paths(config_text: str, folder: Path) -> str:
    """The run config's absolute paths (data.path, run.log_dir, ...) without the author's folders: relative to the
    folder above the run (the log folder) when inside it, else only the file's name after '.../'. A shared
    report does not show where its author keeps files (/home/<name>/...)."""
    import os
    import re

    base = folder.resolve().parent

    def relative(match: re.Match) -> str:
        key, quote, value = match.group(1), match.group(2), match.group(3)
        inside = os.path.commonpath([base, value]) == str(base)
        below = os.path.relpath(value, base)
        shown = (".." if below == "." else os.path.join("..", below)) if inside else f".../{os.path.basename(value)}"
        return f"{key}{quote}{shown}{quote}"

    return re.sub(r"^(\s*(?:path|log_dir|memory_map_dir): )(['\"]?)(/[^'\"\n]*)\2$", relative, config_text,
                  flags=re.MULTILINE)


def build_report(run_path: str | Path) -> str:
    """The report's HTML for a run folder."""
    import matplotlib

    run = RunFiles(Path(run_path))
    predictions = run.csv(PREDICTIONS_TEST_CSV)
    # names from the data (symbols like $BTC, extra columns) are text, never mathtext: two `$` would break a plot
    with matplotlib.rc_context({"text.parse_math": False}):
        sections = [section_overview(run), section_metrics(run), section_quant(run), section_data(run),
                    section_training(run),
                    section_calibration(run, predictions), section_interpretation(run),
                    section_ensemble(run, predictions), section_config(run)]
    title = f"Enhanced TFT run {run.path.name}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def write_report(run_path: str | Path) -> Path:
    """Build report.html in the run folder (written whole: a reader never sees half a page)."""
    path = RunFolder(run_path).write_text(REPORT_HTML, build_report(run_path))
    log.info("report: %s", path)
    return path
