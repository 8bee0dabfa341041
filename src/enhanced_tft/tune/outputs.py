"""The files a study leaves in LOG_DIR/tune_<study>/ (trials.csv, best_config.yaml, tune_report.html,
tune_summary.json), each rewritten whole after every trial, and the console lines of a study."""
from __future__ import annotations

import html
import json
import logging
import sys
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
from optuna.trial import TrialState

from ..config import schema as config_mod
from ..config.schema import Config
from ..report.page import STYLE, html_table, img_tag, key_values_table, note_paragraph
from ..report.plots import new_figure, to_png
from ..runs import spreadsheet_safe, write_text_atomic
from .noise import NOISE_SDS, REFITS_ATTR, noise_summary
from .study import BEST_CONFIG_YAML, TRIALS_CSV, TUNE_REPORT_HTML, TUNE_SUMMARY_JSON, trial_config

log = logging.getLogger("enhanced_tft.tune")

OBJECTIVE = ("mean over the members of each member's best validation loss, lower is better (member 0's epochs "
             "feed the pruner); the test split is never looked at")


def objective_text(folds: int) -> str:
    if folds == 1:
        return OBJECTIVE
    return (f"mean over {folds} walk-forward folds (the last {folds} validation blocks before the test split, each "
            "fold trained on the bars before its block) of each fold's mean over the members of each member's best "
            "validation loss, lower is better (member 0's epochs in the last fold, trained first, feed the pruner); "
            "the test split is never looked at")


def finish(study, folder: Path, stop_code: int) -> int:
    """The closing lines; exit 3 when every trial of the study ended without a result."""
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if not complete:
        if stop_code or not trials or any(t.state.name in ("RUNNING", "WAITING") for t in trials):
            log.info("study %r: no complete trial yet (%s)", study.study_name, counts)
            return stop_code
        notes = [t.user_attrs["note"] for t in trials if "note" in t.user_attrs]
        print(f"etft tune: error: no trial completed ({counts})" + (f"; the last said: {notes[-1]}" if notes else ""),
              file=sys.stderr)
        return 3
    best = min(complete, key=lambda t: t.value)
    log.info("study %r: %s; best trial %d, val loss %.5g; report %s", study.study_name, counts, best.number,
             best.value, folder / TUNE_REPORT_HTML)
    print(folder / BEST_CONFIG_YAML)
    return stop_code


def state_counts(trials) -> str:
    """e.g. '3 complete, 1 pruned'."""
    return ", ".join(f"{sum(t.state == s for t in trials)} {s.name.lower()}" for s in TrialState
                     if any(t.state == s for t in trials)) or "no trials"


def trial_line(study, trial) -> str:
    """One progress line: number, outcome, params, best so far."""
    params = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    note = trial.user_attrs.get("note")
    outcome = (f"val loss {trial.value:.5g}" if trial.state.name == "COMPLETE" else
               trial.state.name.lower() + (f" ({note})" if note else ""))
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value, default=None)
    return (f"trial {trial.number} {outcome} | {params} | best " +
            (f"{best.value:.5g} (trial {best.number})" if best else "none yet"))


def write_outputs(study, folder: Path, base: Config) -> None:
    """trials.csv, best_config.yaml (once a trial completed), tune_summary.json and tune_report.html, each whole."""
    trials = study.get_trials(deepcopy=False)
    write_text_atomic(folder / TRIALS_CSV, spreadsheet_safe(trials_frame(trials)).to_csv(index=False))
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    if best is not None:
        write_text_atomic(folder / BEST_CONFIG_YAML, best_config_text(study, best, base))
    summary = study_summary(study, trials, best, base)
    write_text_atomic(folder / TUNE_SUMMARY_JSON, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    write_text_atomic(folder / TUNE_REPORT_HTML, report_html(study, trials, best, summary))


def study_summary(study, trials, best, base: Config) -> dict:
    """tune_summary.json: the objective, the trials' spread against the seed noise (with the verdict), the best
    trial and its folds, the refits, the worker processes."""
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    folds = study.user_attrs.get("folds", 1)
    return {"study": study.study_name, "objective": objective_text(folds), "folds": folds,
            "trials": state_counts(trials),
            "best": None if best is None else {"number": best.number, "value": best.value, "params": best.params,
                                               "folds": best.user_attrs.get("folds")},
            "noise": noise_summary([t.value for t in complete], study.user_attrs.get(REFITS_ATTR, []), base.seed),
            "refits": study.user_attrs.get(REFITS_ATTR, []),
            "workers": study.user_attrs.get("workers"),
            "trial_folds": {t.number: t.user_attrs["folds"] for t in trials if "folds" in t.user_attrs}}


def trials_frame(trials):
    """One row per trial: number, state, value, each fold's validation loss (--folds K), duration, each tuned key,
    the process that ran it, note, run folder."""
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    num_folds = max((len(t.user_attrs.get("folds", [])) for t in trials), default=0)
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials
                  if t.system_attrs.get("retry_history")}

    def fold_losses(t) -> dict:
        losses = {f["fold"]: f["val_loss"] for f in t.user_attrs.get("folds", [])}
        return {f"fold_{k}_val_loss": losses.get(k) for k in range(num_folds)}

    rows = [{"number": t.number, "state": t.state.name, "value": t.value, **fold_losses(t),
             "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
             **{k: t.params.get(k) for k in keys}, "pid": t.user_attrs.get("pid"), "run": t.user_attrs.get("run", ""),
             "note": t.user_attrs.get("note") or (f"its process stopped (no heartbeat); retried as trial "
                                                  f"{retried_as[t.number]}" if t.number in retried_as else "")}
            for t in trials]
    return pd.DataFrame(rows, columns=["number", "state", "value", *[f"fold_{k}_val_loss" for k in range(num_folds)],
                                       "duration_s", *keys, "pid", "note", "run"])


def best_config_text(study, best, base: Config) -> str:
    stored = best.user_attrs.get("config")
    cfg = config_mod.build_config(stored) if stored else trial_config(base, best.params)
    tuned = ", ".join(f"{k}={v}" for k, v in best.params.items())
    return (f"# best trial {best.number} of etft tune study {study.study_name!r}: validation loss {best.value:.6g}\n"
            f"# tuned: {tuned}\n# train it: etft train --config <this file>\n"
            + config_mod.to_yaml(cfg))


def report_html(study, trials, best, summary: dict) -> str:
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    sections = [key_values_table([["study", study.study_name], ["trials", state_counts(trials)],
                                  ["objective", summary["objective"]],
                                  ["best trial", f"{best.number}: {best.value:.6g}" if best else "none complete yet"],
                                  ["best config", "best_config.yaml (etft train --config best_config.yaml)" if best else
                                   "written once a trial completes"]])]
    sections.append(noise_section(summary["noise"]))
    sections.append("<h2>Search history</h2>" + (img_tag(history_png(trials, summary["noise"]["seed_noise"]),
                                                         "objective per trial") if complete
                                                 else note_paragraph("no complete trial yet")))
    importances, why = param_importances(study, complete)
    sections.append("<h2>Parameter importances</h2>" + (
        img_tag(importance_png(importances), "parameter importances") + note_paragraph(
            "optuna.importance.get_param_importances over the complete trials") if importances
        else note_paragraph(why)))
    if best:
        sections.append(f"<h2>Best trial ({best.number})</h2>" + key_values_table(
            [[k, v] for k, v in best.params.items()] + [["run", best.user_attrs.get("run", "")]]))
        if best.user_attrs.get("folds"):
            sections.append(note_paragraph("its folds: validation loss and run folder of each") + html_table(
                ["fold", "validation loss", "run"], [[f["fold"], f["val_loss"], f["run"]]
                                                     for f in best.user_attrs["folds"]]))
    if summary.get("workers"):
        sections.append("<h2>Worker processes</h2>" + html_table(
            ["worker", "pid", "torch threads", "exit code"],
            [[w["index"], w["pid"], w.get("threads", "-"), w["exit_code"]] for w in summary["workers"]]))
    frame = trials_frame(trials)
    cells = frame.astype(object).where(frame.notna(), "")
    sections.append("<h2>Trials</h2>" + html_table(list(frame.columns), cells.values.tolist()))
    title = f"etft tune: study {study.study_name}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def noise_section(noise: dict) -> str:
    """Does the best trial beat the base config by more than a refit moves it? The verdict and its numbers."""
    trials, seed = noise["trials"], noise["seed_noise"]
    rows = [["complete trials", trials["num_complete"]], ["best score", _shown(trials["best"])],
            ["trial scores: sd", _shown(trials["sd"])], ["trial scores: range", _shown(trials["range"])]]
    if seed:
        rows += [["base config over seeds", ", ".join(f"seed {s}: {v:.6g}" for s, v in zip(seed["seeds"],
                                                                                            seed["scores"]))],
                 ["seed noise: sd", _shown(seed["sd"])],
                 [f"threshold ({NOISE_SDS:g} seed sd)", _shown(seed["threshold"])],
                 ["best - base (mean over seeds)", "-" if noise["best_minus_base"] is None
                  else f"{noise['best_minus_base']:+.6g}"]]
    return ("<h2>Best trial against the seed noise</h2>" + f"<p><b>{html.escape(noise['verdict'])}</b></p>"
            + key_values_table(rows) + note_paragraph(noise["rule"]))


def _shown(value) -> str:
    return "-" if value is None else f"{value:.6g}"


def param_importances(study, complete) -> tuple[dict[str, float], str]:
    """optuna's importances, or why there are none."""
    if len(complete) < 2:
        return {}, f"importances need at least 2 complete trials ({len(complete)} so far)"

    try:
        with warnings.catch_warnings():   # "quantiles select the same set of trials" while trials are few
            warnings.simplefilter("ignore", UserWarning)
            return optuna.importance.get_param_importances(study), ""
    except (ValueError, RuntimeError, ImportError, ZeroDivisionError) as err:   # too few distinct values, say
        return {}, f"importances not available yet: {str(err).splitlines()[0][:200]}"


def history_png(trials, seed_noise: dict | None = None) -> bytes:
    """Validation loss per trial (pruned ones at their last reported epoch), the best so far, and where measured the
    base config's score over seeds with its noise band (mean +- the threshold)."""

    fig = new_figure(8, 3.4)
    ax = fig.subplots()
    if seed_noise:
        mean, band = seed_noise["base_mean"], seed_noise["threshold"]
        ax.axhspan(mean - band, mean + band, color="#2ca02c", alpha=0.15, lw=0,
                   label=f"base config +- {NOISE_SDS:g} seed sd ({seed_noise['num_seeds']} seeds)")
        ax.axhline(mean, color="#2ca02c", lw=1)
    done = sorted((t for t in trials if t.state.name == "COMPLETE"), key=lambda t: t.number)
    numbers, values = [t.number for t in done], [t.value for t in done]
    ax.plot(numbers, values, "o", color="#1f77b4", label="complete")
    ax.step(numbers, np.minimum.accumulate(values), where="post", color="#d62728", label="best so far")
    pruned = [(t.number, t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state.name == "PRUNED" and t.intermediate_values]
    if pruned:
        ax.plot(*zip(*pruned), "x", color="#7f7f7f", label="pruned (last val loss)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(xlabel="trial", ylabel="validation loss", title="objective per trial")
    ax.legend(fontsize=8)
    return to_png(fig)


def importance_png(importances: dict[str, float]) -> bytes:
    fig = new_figure(7, 0.4 * len(importances) + 1.2)
    ax = fig.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#1f77b4")
    ax.set(xlabel="importance (share of the objective's variation)", title="parameter importances")
    return to_png(fig)
