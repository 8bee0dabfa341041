"""`etft tune`: its arguments, checked before Optuna is imported so that bad input answers at once; the study
itself is tune/runner.py."""
from __future__ import annotations

import argparse
import json
import re
import sys

from ..config import schema as config_mod
from ..errors import UserError
from ..runtime.threads import configure_threads
from ..tune.space_file import DEFAULT_SPACE

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_REFITS = 20
MAX_WORKERS = 64


def add_parser(commands) -> None:
    tune = commands.add_parser("tune", help="search hyperparameters with Optuna: each trial an etft train run, "
                                            "scored by its validation loss")
    tune.add_argument("--config", metavar="FILE", help="base YAML config of every trial (default: built-in defaults)")
    tune.add_argument("--space", metavar="FILE", help="YAML search space: `section.key: {type: int|float|categorical, "
                      "low, high, log, step, choices}` (default: the space shipped in the package, enhanced_tft/tune/space.yaml)")
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
    tune.add_argument("--folds", type=int, default=1, metavar="K",
                      help="score a trial by the mean validation loss over the last K walk-forward blocks before the "
                           "test split, each fold trained on the bars before its block (default: 1, the one split)")
    tune.add_argument("--refits", type=int, default=0, metavar="R",
                      help="once the trials are done, train the base config again with R other seeds, scored as a "
                           "trial: the report says whether the best trial beats the base by more than that seed "
                           "noise (default: 0, not measured)")
    tune.add_argument("--workers", type=int, default=1, metavar="N",
                      help="run N local worker processes on the study (its RDB storage), the CPUs split between them "
                           "(default: 1, this process)")
    tune.add_argument("--worker", type=int, help=argparse.SUPPRESS)    # a worker process started by --workers
    tune.add_argument("--threads", type=int, help=argparse.SUPPRESS)   # its torch threads
    tune.add_argument("--verbose", action="store_true", help="show the trainings' own console lines too")


WORKER_FLAGS = ("--config", "--space", "--trials", "--study", "--log_dir", "--timeout", "--heartbeat", "--folds")


def worker_command(args: argparse.Namespace) -> list[str]:
    """The `etft tune` each worker runs: this one's study and settings, without --workers or --refits."""
    command = [sys.executable, "-m", "enhanced_tft", "tune"]
    for flag in WORKER_FLAGS:
        value = getattr(args, flag.lstrip("-"))
        if value is not None:
            command += [flag, str(value)]
    for override in args.overrides:
        command += ["--set", override]
    return command + (["--verbose"] if args.verbose else [])


def run(args: argparse.Namespace) -> int:
    for flag, value, ok, allowed in (
            ("--trials", args.trials, args.trials >= 1, "an integer >= 1, the study's total number of trials"),
            ("--timeout", args.timeout, args.timeout is None or args.timeout > 0, "seconds > 0"),
            ("--heartbeat", args.heartbeat, args.heartbeat >= 1, "whole seconds >= 1"),
            ("--study", args.study, STUDY_NAME.fullmatch(args.study), "letters, digits, _ . - (it names files)"),
            ("--refits", args.refits, 0 <= args.refits <= MAX_REFITS, f"an integer from 0 to {MAX_REFITS}"),
            ("--workers", args.workers, 1 <= args.workers <= MAX_WORKERS, f"an integer from 1 to {MAX_WORKERS}")):
        if not ok:
            raise UserError(f"{flag}={value!r}; allowed: {allowed}")
    overrides = args.overrides + ([f"run.log_dir={json.dumps(args.log_dir)}"] if args.log_dir else [])
    base = config_mod.load_config(args.config, overrides)
    if base.data.walk_forward_folds and base.data.fold is None:
        raise UserError("etft tune trains one split per trial; set data.walk_forward_folds=0, or tune on one fold "
                        "with --set data.fold=K")
    try:
        import optuna  # noqa: F401  (an optional extra: say so before any work)
    except ImportError:
        raise UserError("etft tune needs Optuna: pip install 'enhanced-tft[tune]'") from None
    if args.folds != 1:
        _check_folds(args.folds, base)
    from ..tune.runner import run_tune
    configure_threads(args.threads)   # a worker's share of the CPUs, else the CPUs this process may use
    workers = args.workers if args.workers > 1 else 0
    return run_tune(base, args.space or DEFAULT_SPACE, args.study, args.trials, args.storage, args.heartbeat,
                    args.timeout, args.verbose, folds=args.folds, refits=args.refits, workers=workers,
                    worker_command=worker_command(args) if workers else None, worker=args.worker is not None)


def _check_folds(folds: int, base) -> None:
    """--folds K: walk-forward folds of the base split, as many as its fractions allow; UserError with the range."""
    from ..tune.study import max_folds  # Optuna: after the cheap checks
    data = base.data
    if folds < 1:
        raise UserError(f"--folds={folds}; allowed: 1 to {max_folds(base)} (1 = the one split)")
    if data.walk_forward_folds or data.val_start is not None:
        raise UserError(f"--folds={folds} cuts the base split into walk-forward folds; the base config already sets "
                        f"{'data.walk_forward_folds' if data.walk_forward_folds else 'date splits (data.val_start)'}: "
                        "use --folds 1, or fraction splits without walk_forward_folds")
    most = max_folds(base)
    if not 1 <= folds <= most:
        raise UserError(f"--folds={folds}; allowed: 1 to {most} (each fold's validation block is a test_fraction "
                        f"block earlier: val_fraction {data.val_fraction:g} + folds x test_fraction "
                        f"{data.test_fraction:g} must stay below 0.9, leaving 10% to train on)")
