"""`etft tune`: its arguments, checked before Optuna is imported so that bad input answers at once; the study
itself is tune/runner.py."""
from __future__ import annotations

import argparse
import json
import re

from ..config import schema as config_mod
from ..errors import UserError
from ..runtime.threads import configure_threads
from ..tune.space_file import DEFAULT_SPACE

STUDY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


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
    tune.add_argument("--verbose", action="store_true", help="show the trainings' own console lines too")


def run(args: argparse.Namespace) -> int:
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
    try:
        import optuna  # noqa: F401  (an optional extra: say so before any work)
    except ImportError:
        raise UserError("etft tune needs Optuna: pip install 'enhanced-tft[tune]'") from None
    from ..tune.runner import run_tune
    configure_threads()   # the CPUs this process may use, as in training
    return run_tune(base, args.space or DEFAULT_SPACE, args.study, args.trials, args.storage, args.heartbeat,
                    args.timeout, args.verbose)
