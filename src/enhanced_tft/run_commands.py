"""The commands that use a finished run folder: `etft predict`, `etft evaluate`, `etft report`.

cli.py parses; these build the saved run, the windows and the device, and hand them to predict.py / report.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import time

from . import config as config_mod

log = logging.getLogger("enhanced_tft.cli")


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder (logs/training_...)")
    parser.add_argument("--data", metavar="PATH", help="bars to predict (CSV, gzip CSV, Parquet), every window of "
                        "them; without it, a split of the run's own data")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test",
                        help="without --data: which split of the run's own data (default: test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="how to read --data: data.columns, data.timestamp_format, data.symbol, ... (repeatable)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, metavar="N",
                        help="windows per batch (default: the run's evaluation chunk, 2 x train.batch_size, which "
                             "reproduces its numbers to the bit)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when present")


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    if not Path(args.run).is_dir():
        raise ValueError(f"--run {args.run!r} is not a folder; give a run folder like logs/training_20261128_101500")
    from .report import write_report
    print(write_report(args.run))
    return 0


def _read_overrides(assignments: list[str]) -> dict:
    """--set data.KEY=VALUE for predict/evaluate: only the keys that say how to read a file."""
    from .predict import READ_KEYS
    raw: dict = {}
    for assignment in assignments:
        config_mod.apply_override(raw, assignment)
    section = raw.pop("data", {})
    bad = [k for k in raw] + [f"data.{k}" for k in section if k not in READ_KEYS]
    if bad:
        raise ValueError(f"--set {', '.join(bad)}: only the keys that say how to read --data may change (the model "
                         f"was trained on the run's features); allowed: {', '.join('data.' + k for k in READ_KEYS)}")
    return section


def _prepare_prediction(args: argparse.Namespace):
    """The saved run, the windows to predict, and the device and precision the run evaluated with."""
    if args.batch_size is not None and args.batch_size < 1:
        raise ValueError(f"--batch-size={args.batch_size}; allowed: an integer >= 1")
    read = _read_overrides(args.overrides)
    from .predict import SavedRun, prediction_windows
    from .train.precision import resolve_device, resolve_precision

    from .threads import configure_threads
    configure_threads()   # the CPUs this process may use, as in training
    run = SavedRun.open(args.run)
    device = resolve_device(args.device)
    policy = resolve_precision(run.cfg.train.mixed_precision, device)
    windows, target_known = prediction_windows(run, args.data, args.split, read)
    batch_size = args.batch_size or 2 * run.cfg.train.batch_size
    what = args.data or f"the {args.split} split of the run's data"
    log.info("%s: %d windows of %d symbol(s); %d member(s) on %s, %s", what, len(windows), len(run.transform.symbols),
             run.cfg.train.ensemble_size, device, policy.name)
    return run, windows, target_known, device, policy, batch_size


def cmd_predict(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .predict import TableWriter, predict_to_file
    out = Path(args.out) if args.out else Path(args.run) / "predictions.parquet"
    TableWriter(out)   # checks the file ending before any work
    if out.exists() and not args.overwrite:
        raise ValueError(f"--out {str(out)!r} already exists; give another --out, or add --overwrite to replace it")
    if not out.parent.is_dir():
        raise ValueError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    run, windows, target_known, device, policy, batch_size = _prepare_prediction(args)
    started = time.time()
    rows = predict_to_file(run, windows, target_known, out, device, policy, batch_size)
    log.info("wrote %d predictions to %s in %.1f s", rows, out, time.time() - started)
    print(out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .predict import evaluate_windows
    run, windows, target_known, device, policy, batch_size = _prepare_prediction(args)
    result = evaluate_windows(run, windows, target_known, device, policy, batch_size)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    test, baseline, mean_member = result["test"], result["baseline"], result["ensemble"]["mean_member"]
    several = result["ensemble"]["size"] > 1
    keys = [k for k in test if k not in ("num_samples", "up_rate", "majority_rate") and k in baseline]
    lines = [f"{args.data or 'the run' + chr(39) + 's ' + args.split + ' split'}: {test['num_samples']} samples scored",
             f"  {'metric':<20}{'ensemble' if several else 'model':>12}" + (f"{'mean member':>14}" if several else "")
             + f"{'baseline':>12}"]
    lines += [f"  {k:<20}{test[k]:>12.4f}" + (f"{mean_member[k]:>14.4f}" if several else "") + f"{baseline[k]:>12.4f}"
              for k in keys]
    lines.append(f"baseline: {baseline['rule']} (fitted on the run's train split)")
    print("\n".join(lines))
    return 0
