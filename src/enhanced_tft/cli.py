"""`etft` command line: parsing and dispatch. The work is in workflow.py (train), predict.py (predict,
evaluate), report.py, plan_report.py, bench.py and tune.py (etft tune).

Exit codes: 0 done; 2 bad input (UserError: its message, no traceback); 3 training could not go on (out of
memory at one sample, NaN/inf steps in a row); 130 / 143 stopped by SIGINT / SIGTERM with a checkpoint;
1 an internal error, with its traceback and a line saying what to report (or, under torchrun, another rank
stopped: one line, the failing rank's own log says why).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from . import config as config_mod
from . import tasks
from .config import UserError

log = logging.getLogger("enhanced_tft.cli")

ISSUES_HINT = ("this is a bug in Enhanced TFT, not in your input: please report it with the command line, the "
               "config and the traceback above")


def _add_overrides(parser: argparse.ArgumentParser, example: str = "model.d_model=64") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def _add_train_parser(commands) -> None:
    train = commands.add_parser("train", help="train a model (or an ensemble) and write a run folder")
    train.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults = configs/default.yaml)")
    train.add_argument("--task", choices=tasks.names(), help="overrides the config's task")
    train.add_argument("--test_mode", action="store_true",
                       help="the seed's smoke run: small data slice, small model, 2 epochs, full run folder "
                            "(--set values still win)")
    train.add_argument("--ensemble_size", type=int, metavar="N", help="train N members with seeds seed..seed+N-1")
    train.add_argument("--log_dir", metavar="DIR", help="parent of the run folders (default: logs)")
    _add_overrides(train)
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a stopped run from its newest checkpoint (logs/training_...)")
    train.add_argument("--allow-changed-data", "--allow_changed_data", dest="allow_changed_data",
                       action="store_true", help="with --resume: go on although the data file changed since the run "
                       "started (its fitted scaling must still match)")
    train.add_argument("--data", metavar="PATH",
                       help="train on your OHLCV file (CSV, gzip CSV, Parquet): sets data.source=file and "
                            "data.path=PATH; other data.* keys via --set, e.g. --set data.columns='{timestamp: Date}'")
    train.add_argument("--auto_batch", action="store_true",
                       help="pick the largest micro-batch that fits (GPU memory, or --gpu-memory) and keep the effective batch")
    train.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", metavar="SIZE",
                       help="memory budget for --auto_batch, e.g. 24GiB (default: the GPU's total memory)")


def _add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
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
    parser.add_argument("--allow-changed-data", "--allow_changed_data", dest="allow_changed_data",
                        action="store_true", help="without --data: use the run's data file although it changed "
                        "since training (its fitted scaling must still match)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etft", description="Enhanced TFT for market time series")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train_parser(commands)
    plan = commands.add_parser("plan", help="predict the memory of one training step before training (no GPU needed)")
    plan.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    _add_overrides(plan, "train.batch_size=128")
    plan.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", metavar="SIZE",
                      help="memory budget, e.g. 24GiB or 8GB: also find the largest micro-batch that fits")
    plan.add_argument("--num-features", "--num_features", dest="num_features", type=int, metavar="N",
                      help="observed input variables (default: what the config's data section produces)")
    plan.add_argument("--nproc-per-node", "--nproc_per_node", dest="num_devices", type=int, default=1, metavar="N",
                      help="data-parallel devices sharing the effective batch (torchrun --nproc-per-node N): the "
                           "fit is per device")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    report = commands.add_parser("report", help="(re)build report.html of a run folder from its files")
    report.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder (logs/training_...)")
    predict = commands.add_parser("predict", help="predictions of a saved run, streamed to a Parquet or CSV file")
    _add_prediction_arguments(predict)
    predict.add_argument("--out", metavar="FILE", help="output .parquet, .csv or .csv.gz (default: RUN_DIR/predictions.parquet)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    predict.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                         help="torch (default), or onnx: the run's ONNX export (etft export) by ONNX Runtime on the CPU")
    export = commands.add_parser("export", help="a finished run's members as ONNX files, with its transform and a "
                                 "manifest (SHA-256 of each file), for serving without torch")
    export.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder (logs/training_...)")
    export.add_argument("--format", choices=("onnx",), default="onnx", help="the file format (default: onnx)")
    export.add_argument("--out", metavar="DIR", help="the export folder (default: RUN_DIR/onnx)")
    export.add_argument("--overwrite", action="store_true", help="replace an export in --out (default: refuse)")
    evaluate = commands.add_parser("evaluate", help="score a saved run on other data or a split, against the naive baselines")
    _add_prediction_arguments(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    from .bench_cli import add_bench_parser
    add_bench_parser(commands)
    from .tune_cli import add_tune_parser
    add_tune_parser(commands)
    return parser


# ---------------------------------------------------------------- train

def _train_overrides(args: argparse.Namespace) -> list[str]:
    """--set assignments, then the flags that are shorthands for config keys."""
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"task={args.task}")
    if args.ensemble_size is not None:
        overrides.append(f"train.ensemble_size={args.ensemble_size}")
    if args.log_dir:
        overrides.append(f"run.log_dir={json.dumps(args.log_dir)}")   # quoted: a path is text, not YAML
    if args.data:
        path = os.path.abspath(os.path.expanduser(args.data))
        overrides += ["data.source=file", f"data.path={json.dumps(path)}"]
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from .workflow import TrainRequest, resume_request, train
    if args.gpu_memory and not args.auto_batch:
        raise UserError("--gpu-memory is the budget of --auto_batch; add --auto_batch, or use `etft plan --gpu-memory`")
    if args.resume:
        for flag, given in (("--config", args.config), ("--data", args.data), ("--test_mode", args.test_mode),
                            ("--auto_batch", args.auto_batch), ("--log_dir", args.log_dir)):
            if given:
                raise UserError(f"{flag} cannot be combined with --resume: a resumed run keeps its own config and "
                                "folder; allowed with --resume: --set for "
                                f"{', '.join(config_mod.SAFE_RESUME_CHANGES)}")
        cfg, request = resume_request(args.resume, _train_overrides(args))
        return train(cfg, replace(request, allow_changed_data=args.allow_changed_data))
    if args.allow_changed_data:
        raise UserError("--allow-changed-data goes with --resume (a new run fingerprints the data it starts with)")
    cfg = config_mod.load_config(args.config, _train_overrides(args), test_mode=args.test_mode)
    return train(cfg, TrainRequest(auto_batch=args.auto_batch, gpu_memory=args.gpu_memory))


# ---------------------------------------------------------------- plan, report

def cmd_plan(args: argparse.Namespace) -> int:
    cfg = config_mod.load_config(args.config, args.overrides)
    if args.num_features is not None and args.num_features < 1:
        raise UserError(f"--num-features={args.num_features}; allowed: an integer >= 1")
    if args.num_devices < 1:
        raise UserError(f"--nproc-per-node={args.num_devices}; allowed: an integer >= 1")
    if args.num_devices > 1 and not args.gpu_memory:
        raise UserError("--nproc-per-node shares the effective batch for a budget fit; add --gpu-memory SIZE")
    from .api import plan
    result = plan(cfg, args.gpu_memory, num_features=args.num_features, num_devices=args.num_devices)
    print(json.dumps(result.details, indent=2) if args.json else result)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if not Path(args.run).is_dir():
        raise UserError(f"--run {args.run!r} is not a folder; give a run folder like logs/training_20261128_101500")
    from .report import write_report
    print(write_report(args.run))
    return 0


# ---------------------------------------------------------------- predict, evaluate

def _check_changed_data_flag(args: argparse.Namespace) -> None:
    if args.allow_changed_data and args.data:
        raise UserError("--allow-changed-data applies to the run's own data (no --data); --data PATH is new data anyway")


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import TableWriter, predict_to_file
    from .runs import PREDICTIONS_DEFAULT
    out = Path(args.out) if args.out else Path(args.run) / PREDICTIONS_DEFAULT
    TableWriter(out)   # checks the file ending before any work
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {str(out)!r} already exists; give another --out, or add --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    _check_changed_data_flag(args)
    from .predict import open_prediction
    job = open_prediction(args.run, args.data, args.split, args.overrides, args.batch_size, args.device,
                          args.allow_changed_data)
    started = time.time()
    rows = predict_to_file(job.run, job.windows, job.target_known, out, job.device, job.policy, job.batch_size,
                           args.engine)
    log.info("wrote %d predictions to %s in %.1f s", rows, out, time.time() - started)
    print(out)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .api import Run
    from .evaluation import metrics_table
    from .predict import read_overrides
    _check_changed_data_flag(args)
    read = read_overrides(args.overrides)
    run = Run.open(args.run)
    result = run.evaluate(args.data, split=args.split, read=read, batch_size=args.batch_size, device=args.device,
                          allow_changed_data=args.allow_changed_data)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    what = args.data or f"the run's {args.split} split"
    several = result["ensemble"]["size"] > 1
    print(metrics_table(run.task, result["test"], result["baseline"],
                        f"{result['baseline']['rule']} (fitted on the run's train split)",
                        result["ensemble"]["mean_member"] if several else None,
                        f"{what}: {result['test']['num_samples']} samples scored", result.get("strong_baseline")))
    if "quant" in result:
        from .quant import format_quant
        print(format_quant(result["quant"]["model"], result["quant"].get("strong_baseline")))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_run
    print(export_run(args.run, args.out, args.overwrite))
    return 0


COMMANDS = {"train": cmd_train, "plan": cmd_plan, "report": cmd_report, "predict": cmd_predict,
            "evaluate": cmd_evaluate, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    from .runs import setup_console_logging
    from .threads import tune_host_allocator

    tune_host_allocator()   # before torch is imported: reuse freed tensor memory, huge pages for large tensors
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console_logging()
    if args.command == "bench":
        from .bench_cli import cmd_bench
        command = cmd_bench
    elif args.command == "tune":
        from .tune_cli import cmd_tune
        command = cmd_tune
    else:
        command = COMMANDS[args.command]
    try:
        return command(args)
    except UserError as err:
        print(f"etft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"etft {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from .train.distributed import RankLost
        from .train.memory import OutOfMemoryGiveUp
        from .train.resume import NonFiniteGiveUp
        if isinstance(err, RankLost):   # not a bug here: the rank that failed says why
            print(f"etft {args.command}: error: {err}", file=sys.stderr)
            return 1
        from .train.memory import is_out_of_memory
        if is_out_of_memory(err):   # outside a step (moving the model, building data, say): no recovery there
            err = OutOfMemoryGiveUp(f"out of memory outside a training step ({str(err).splitlines()[0]}); "
                                    "`etft plan` shows what fits; lower model.d_model or model.ff_dim")
        if isinstance(err, (OutOfMemoryGiveUp, NonFiniteGiveUp)):
            print(f"etft {args.command}: error: {err}", file=sys.stderr)
            return 3
        import traceback
        traceback.print_exc()
        print(f"etft {args.command}: internal error: {ISSUES_HINT}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
