"""`etft tune` arguments and command, and the files a study leaves in LOG_DIR/tune_<study>/ (trials.csv,
best_config.yaml, tune_report.html), rewritten whole after every trial. The study itself is tune.py; optuna and
torch are imported only once the arguments are known to be good, so that bad input answers at once."""
from __future__ import annotations

import argparse
import html
import json
import logging
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from . import config as config_mod
from .config import Config, UserError
from .runs import spreadsheet_safe, write_text_atomic

log = logging.getLogger("enhanced_tft.tune")

DEFAULT_SPACE = Path(__file__).resolve().parents[2] / "configs" / "tune_space.yaml"
STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
OBJECTIVE = ("mean over the members of each member's best validation loss, lower is better (member 0's epochs "
             "feed the pruner); the test split is never looked at")


def add_tune_parser(commands) -> None:
    tune = commands.add_parser("tune", help="search hyperparameters with Optuna: each trial an etft train run, "
                                            "scored by its validation loss")
    tune.add_argument("--config", metavar="FILE", help="base YAML config of every trial (default: built-in defaults)")
    tune.add_argument("--space", metavar="FILE", help="YAML search space: `section.key: {type: int|float|categorical, "
                      "low, high, log, step, choices}` (default: configs/tune_space.yaml)")
    tune.add_argument("--trials", type=int, required=True, metavar="N",
                      help="trials the study holds when done, shared by every process on the storage (a study run "
                           "again goes on to N)")
    tune.add_argument("--storage", metavar="URL", help="SQLAlchemy URL of the study's database, shared by processes "
                      "and machines (default: sqlite:///LOG_DIR/tune_<study>.db)")
    tune.add_argument("--study", default="etft", metavar="NAME", help="study name (default: etft)")
    tune.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a value of the base config, e.g. --set train.epochs=20 (repeatable)")
    tune.add_argument("--log_dir", metavar="DIR", help="trial run folders go to DIR/tune_<study>/ (default: logs)")
    tune.add_argument("--timeout", type=float, metavar="SECONDS", help="start no trial after this long")
    tune.add_argument("--heartbeat", type=int, default=60, metavar="SECONDS",
                      help="a running trial tells the storage it is alive this often; one silent for twice as long "
                           "(its process was killed) is failed and queued again (default: 60)")
    tune.add_argument("--verbose", action="store_true", help="show the trainings' own console lines too")


def cmd_tune(args: argparse.Namespace) -> int:
    for flag, value, ok, allowed in (
            ("--trials", args.trials, args.trials >= 1, "an integer >= 1, the study's total number of trials"),
            ("--timeout", args.timeout, args.timeout is None or args.timeout > 0, "seconds > 0"),
            ("--heartbeat", args.heartbeat, args.heartbeat >= 1, "whole seconds >= 1"),
            ("--study", args.study, STUDY_NAME.fullmatch(args.study), "letters, digits, _ . - (it names files)")):
        if not ok:
            raise UserError(f"{flag}={value!r}; allowed: {allowed}")
    overrides = args.overrides + ([f"run.log_dir={json.dumps(args.log_dir)}"] if args.log_dir else [])
    base = config_mod.load_config(args.config, overrides)
    if base.data.walk_forward_folds and base.data.fold is None:
        raise UserError("etft tune trains one split per trial; set data.walk_forward_folds=0, or tune on one fold "
                        "with --set data.fold=K")
    if args.space is None and not DEFAULT_SPACE.is_file():
        raise UserError(f"no --space given and the default {DEFAULT_SPACE} is missing; give --space FILE (a copy "
                        "of the repository's configs/tune_space.yaml)")
    try:
        import optuna
    except ImportError:
        raise UserError("etft tune needs Optuna: pip install 'enhanced-tft[tune]'") from None
    from . import tune
    space = tune.load_space(args.space or DEFAULT_SPACE)
    folder = Path(base.run.log_dir) / f"tune_{args.study}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"run.log_dir={base.run.log_dir!r}: {folder} cannot be created: {err.strerror}") from None
    url = args.storage or f"sqlite:///{folder.resolve().parent / f'tune_{args.study}.db'}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # one line per trial is ours; failures are in its note
    with tune.quiet_optuna():
        storage = tune.open_storage(url, args.heartbeat)
        study = tune.open_study(storage, args.study, base, space)
        objective = tune.Objective(base, space, folder, args.trials, None if args.verbose else quiet_trainings)

        def on_trial(study, trial) -> None:
            log.info(trial_line(study, trial))
            write_outputs(study, folder, base)

        log.info("study %r (%s): %d trial(s) so far, %d wanted; trials train in %s", args.study, tune.shown_url(url),
                 len(tune.counted(study.get_trials(deepcopy=False))), args.trials, folder)
        try:
            tune.run_study(study, objective, args.timeout, on_trial)
        except BaseException:   # Ctrl-C between trials, say: the best so far is written, the error stays the error
            try:
                write_outputs(study, folder, base)
            except Exception as err:
                log.warning("the study's files could not be written: %s", err)
            raise
        write_outputs(study, folder, base)
        return finish(study, folder, objective.stop_code)


def finish(study, folder: Path, stop_code: int) -> int:
    """The closing lines; exit 3 when every trial of the study ended without a result."""
    from .tune import BEST_CONFIG_YAML, TUNE_REPORT_HTML
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
    from optuna.trial import TrialState
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


@contextmanager
def quiet_trainings():
    """While a trial trains, the console shows only etft tune's lines and warnings; the trial's training.log
    keeps every line (it is a file handler, not the console's)."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name == log.name
    # the console handler runs.setup_console_logging installed (marked so that it is installed once)
    handlers = [h for h in logging.getLogger("enhanced_tft").handlers if getattr(h, "_etft_console", False)]
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)


# ---------------------------------------------------------------- the study's files

def write_outputs(study, folder: Path, base: Config) -> None:
    """trials.csv, best_config.yaml (once a trial completed) and tune_report.html, each written whole."""
    from . import tune
    trials = study.get_trials(deepcopy=False)
    write_text_atomic(folder / tune.TRIALS_CSV, spreadsheet_safe(trials_frame(trials)).to_csv(index=False))
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    best = min(complete, key=lambda t: t.value) if complete else None
    if best is not None:
        write_text_atomic(folder / tune.BEST_CONFIG_YAML, best_config_text(study, best, base))
    write_text_atomic(folder / tune.TUNE_REPORT_HTML, report_html(study, trials, best))


def trials_frame(trials):
    """One row per trial: number, state, value, duration, each tuned key, note, run folder."""
    import pandas as pd
    keys = list(dict.fromkeys(k for t in trials for k in t.params))
    retried_as = {t.system_attrs["retry_history"][-1]: t.number for t in trials
                  if t.system_attrs.get("retry_history")}
    rows = [{"number": t.number, "state": t.state.name, "value": t.value,
             "duration_s": round(t.duration.total_seconds(), 1) if t.duration else None,
             **{k: t.params.get(k) for k in keys}, "run": t.user_attrs.get("run", ""),
             "note": t.user_attrs.get("note") or (f"its process stopped (no heartbeat); retried as trial "
                                                  f"{retried_as[t.number]}" if t.number in retried_as else "")}
            for t in trials]
    return pd.DataFrame(rows, columns=["number", "state", "value", "duration_s", *keys, "note", "run"])


def best_config_text(study, best, base: Config) -> str:
    from .tune import trial_config
    stored = best.user_attrs.get("config")
    cfg = config_mod.build_config(stored) if stored else trial_config(base, best.params)
    tuned = ", ".join(f"{k}={v}" for k, v in best.params.items())
    return (f"# best trial {best.number} of etft tune study {study.study_name!r}: validation loss {best.value:.6g}\n"
            f"# tuned: {tuned}\n# train it: etft train --config <this file>\n"
            + config_mod.to_yaml(cfg))


def report_html(study, trials, best) -> str:
    from optuna.trial import TrialState

    from .report import _STYLE, _img, _key_values, _note, _table
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    sections = [_key_values([["study", study.study_name], ["trials", state_counts(trials)], ["objective", OBJECTIVE],
                             ["best trial", f"{best.number}: {best.value:.6g}" if best else "none complete yet"],
                             ["best config", "best_config.yaml (etft train --config best_config.yaml)" if best else
                              "written once a trial completes"]])]
    sections.append("<h2>Search history</h2>" + (_img(history_png(trials), "objective per trial") if complete
                                                 else _note("no complete trial yet")))
    importances, why = param_importances(study, complete)
    sections.append("<h2>Parameter importances</h2>" + (
        _img(importance_png(importances), "parameter importances") + _note("optuna.importance.get_param_importances "
                                                                           "over the complete trials") if importances
        else _note(why)))
    if best:
        sections.append(f"<h2>Best trial ({best.number})</h2>" + _key_values(
            [[k, v] for k, v in best.params.items()] + [["run", best.user_attrs.get("run", "")]]))
    frame = trials_frame(trials)
    cells = frame.astype(object).where(frame.notna(), "")
    sections.append("<h2>Trials</h2>" + _table(list(frame.columns), cells.values.tolist()))
    title = f"etft tune: study {study.study_name}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>")


def param_importances(study, complete) -> tuple[dict[str, float], str]:
    """optuna's importances, or why there are none."""
    if len(complete) < 2:
        return {}, f"importances need at least 2 complete trials ({len(complete)} so far)"
    import warnings

    import optuna
    try:
        with warnings.catch_warnings():   # "quantiles select the same set of trials" while trials are few
            warnings.simplefilter("ignore", UserWarning)
            return optuna.importance.get_param_importances(study), ""
    except (ValueError, RuntimeError, ImportError, ZeroDivisionError) as err:   # too few distinct values, say
        return {}, f"importances not available yet: {str(err).splitlines()[0][:200]}"


def history_png(trials) -> bytes:
    """Validation loss per trial (pruned ones at their last reported epoch) and the best so far."""
    import numpy as np

    from .report_plots import _figure, to_png
    fig = _figure(8, 3.4)
    ax = fig.subplots()
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
    from .report_plots import _figure, to_png
    fig = _figure(7, 0.4 * len(importances) + 1.2)
    ax = fig.subplots()
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names], color="#1f77b4")
    ax.set(xlabel="importance (share of the objective's variation)", title="parameter importances")
    return to_png(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m enhanced_tft.tune_cli ARGS` = `etft tune ARGS`, with etft's error handling and exit codes."""
    from .cli import main as etft_main
    return etft_main(["tune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
