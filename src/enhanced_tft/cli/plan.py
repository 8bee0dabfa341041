"""`etft plan`: the memory of one training step before training, and the largest micro-batch a budget fits."""
from __future__ import annotations

import argparse
import json

from ..config import schema as config_mod
from ..errors import UserError
from .common import add_overrides


def add_parser(commands) -> None:
    plan = commands.add_parser("plan", help="predict the memory of one training step before training (no GPU needed)")
    plan.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    add_overrides(plan, "train.micro_batch_size=128")
    plan.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", metavar="SIZE",
                      help="memory budget, e.g. 24GiB or 8GB: also find the largest micro-batch that fits")
    plan.add_argument("--num-features", "--num_features", dest="num_features", type=int, metavar="N",
                      help="observed input variables (default: what the config's data section produces)")
    plan.add_argument("--nproc-per-node", "--nproc_per_node", dest="num_devices", type=int, default=1, metavar="N",
                      help="data-parallel devices sharing the effective batch (torchrun --nproc-per-node N): the "
                           "fit is per device")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    from .. import api
    cfg = config_mod.load_config(args.config, args.overrides)
    if args.num_features is not None and args.num_features < 1:
        raise UserError(f"--num-features={args.num_features}; allowed: an integer >= 1")
    if args.num_devices < 1:
        raise UserError(f"--nproc-per-node={args.num_devices}; allowed: an integer >= 1")
    if args.num_devices > 1 and not args.gpu_memory:
        raise UserError("--nproc-per-node shares the effective batch for a budget fit; add --gpu-memory SIZE")
    result = api.plan(cfg, args.gpu_memory, num_features=args.num_features, num_devices=args.num_devices)
    print(json.dumps(result.details, indent=2) if args.json else result)
    return 0
