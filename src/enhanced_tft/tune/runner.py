"""`etft tune` end to end: open the storage and the study, run trials until the study holds N, and rewrite the
study's files (tune/outputs.py) after every trial."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path

import optuna

from ..config.schema import Config
from ..errors import UserError
from . import study as tune
from .noise import measure_refits
from .outputs import finish, trial_line, write_outputs
from .workers import exits_record, run_workers

log = logging.getLogger("enhanced_tft.tune")


def run_tune(base: Config, space_path: str | Path, study_name: str, trials: int, storage_url: str | None,
             heartbeat_s: int, timeout_s: float | None, verbose: bool, folds: int = 1, refits: int = 0,
             workers: int = 0, worker_command: list[str] | None = None, worker: bool = False) -> int:
    """Run the study `study_name` on `base` over the space in `space_path` until it holds `trials`; the exit code.
    `folds`: walk-forward folds per trial; `refits`: train the base config again with that many other seeds once
    the trials are done (the seed noise); `workers` > 0: start that many `worker_command` processes on the study
    and wait for them instead of training here; `worker`: this process is one of them (the parent finishes)."""
    space = tune.load_space(space_path)
    folder = Path(base.run.log_dir) / f"tune_{study_name}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"run.log_dir={base.run.log_dir!r}: {folder} cannot be created: {err.strerror}") from None
    url = storage_url or default_storage_url(folder)
    optuna.logging.set_verbosity(optuna.logging.ERROR)   # one line per trial is ours; failures are in its note
    with tune.quiet_optuna():
        storage = tune.open_storage(url, heartbeat_s)
        study = tune.open_study(storage, study_name, base, space, folds)
        objective = tune.Objective(base, space, folder, trials, None if verbose else quiet_trainings, folds)

        def on_trial(study, trial) -> None:
            log.info(trial_line(study, trial))
            write_outputs(study, folder, base)

        log.info("study %r (%s): %d trial(s) so far, %d wanted; trials train in %s%s", study_name,
                 tune.shown_url(url), len(tune.counted(study.get_trials(deepcopy=False))), trials, folder,
                 f", {folds} walk-forward folds each" if folds > 1 else "")
        code = 0
        try:
            if workers:
                code, exits = run_workers([*(worker_command or []), "--storage", url], workers)
                study.set_user_attr("workers", exits_record(exits))
            else:
                tune.run_study(study, objective, timeout_s, on_trial)
                code = objective.stop_code
            if refits and not code and not worker:
                measure_refits(study, objective, refits)
                code = objective.stop_code
        except BaseException:   # Ctrl-C between trials, say: the best so far is written, the error stays the error
            try:
                write_outputs(study, folder, base)
            except Exception as err:
                log.warning("the study's files could not be written: %s", err)
            raise
        write_outputs(study, folder, base)
        if worker:
            return code
        return finish(study, folder, code)


def default_storage_url(folder: Path) -> str:
    """sqlite:///LOG_DIR/tune_<study>.db, beside the study's folder."""
    return f"sqlite:///{folder.resolve().parent / f'{folder.name}.db'}"


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
