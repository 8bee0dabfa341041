"""`etft evaluate`: score a saved run on other data or a split, against the naive and strong baselines."""
from __future__ import annotations

import argparse
import json

from ..runtime.threads import configure_threads
from .common import add_prediction_arguments, check_changed_data_flag


def add_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a saved run on other data or a split, against the naive baselines")
    add_prediction_arguments(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from ..api import Run
    from ..evaluation.scorecard import scorecard_table
    from ..serving.predict import read_overrides
    check_changed_data_flag(args)
    configure_threads()   # the CPUs this process may use, as in training
    read = read_overrides(args.overrides)
    run = Run.open(args.run)
    result = run.evaluate(args.data, split=args.split, read=read, batch_size=args.batch_size, device=args.device,
                          allow_changed_data=args.allow_changed_data)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    what = args.data or f"the run's {args.split} split"
    print(scorecard_table(run.task, result, f"{what}: {result['test']['num_samples']} samples scored",
                          f"{result['baseline']['rule']} (fitted on the run's train split)", result.get("strong_baseline"),
                          result.get("blend")))
    return 0
