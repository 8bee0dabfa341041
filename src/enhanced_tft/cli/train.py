"""`etft train`: a new run from a config (and flags that are shorthands for its keys), or `--resume` of a stopped one."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from .. import tasks
from ..config import schema as config_mod
from ..errors import UserError
from ..runtime.threads import configure_threads
from .common import add_overrides


def add_parser(commands) -> None:
    train = commands.add_parser("train", help="train a model (or an ensemble) and write a run folder")
    train.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults = configs/default.yaml)")
    train.add_argument("--task", choices=tasks.names(), help="overrides the config's task")
    train.add_argument("--test_mode", action="store_true",
                       help="the seed's smoke run: small data slice, small model, 2 epochs, full run folder "
                            "(--set values still win)")
    train.add_argument("--ensemble_size", type=int, metavar="N", help="train N members with seeds seed..seed+N-1")
    train.add_argument("--log_dir", metavar="DIR", help="parent of the run folders (default: logs)")
    add_overrides(train)
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


def overrides_of(args: argparse.Namespace) -> list[str]:
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


def run(args: argparse.Namespace) -> int:
    if args.gpu_memory and not args.auto_batch:
        raise UserError("--gpu-memory is the budget of --auto_batch; add --auto_batch, or use `etft plan --gpu-memory`")
    if args.resume:
        for flag, given in (("--config", args.config), ("--data", args.data), ("--test_mode", args.test_mode),
                            ("--auto_batch", args.auto_batch), ("--log_dir", args.log_dir)):
            if given:
                raise UserError(f"{flag} cannot be combined with --resume: a resumed run keeps its own config and "
                                "folder; allowed with --resume: --set for "
                                f"{', '.join(config_mod.SAFE_RESUME_CHANGES)}")
        from ..training.recipe import resume_request, train
        cfg, request = resume_request(args.resume, overrides_of(args))
        configure_threads()   # the CPUs this process may use, not the machine's: oversubscribed threads spin
        return train(cfg, replace(request, allow_changed_data=args.allow_changed_data))
    if args.allow_changed_data:
        raise UserError("--allow-changed-data goes with --resume (a new run fingerprints the data it starts with)")
    cfg = config_mod.load_config(args.config, overrides_of(args), test_mode=args.test_mode)
    from ..training.recipe import TrainRequest, train  # after the config: a bad value answers before torch loads
    configure_threads()
    return train(cfg, TrainRequest(auto_batch=args.auto_batch, gpu_memory=args.gpu_memory))
