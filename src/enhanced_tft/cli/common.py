"""What several commands' parsers share: --set, and the arguments of a saved run's predictions."""
from __future__ import annotations

import argparse

from ..errors import UserError


def add_overrides(parser: argparse.ArgumentParser, example: str = "model.d_model=64") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value, e.g. --set {example} (repeatable)")


def add_prediction_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder (logs/training_...)")
    parser.add_argument("--data", metavar="PATH", help="bars to predict (CSV, gzip CSV, Parquet), every window of "
                        "them; without it, a split of the run's own data")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test",
                        help="without --data: which split of the run's own data (default: test)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="data.KEY=VALUE",
                        help="how to read --data: data.columns, data.timestamp_format, data.symbol, ... (repeatable)")
    parser.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, metavar="N",
                        help="windows per batch (default: the run's evaluation chunk, 2 x train.micro_batch_size, "
                             "which reproduces its numbers to the bit)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: CUDA when present")
    parser.add_argument("--allow-changed-data", "--allow_changed_data", dest="allow_changed_data",
                        action="store_true", help="without --data: use the run's data file although it changed "
                        "since training (its fitted scaling must still match)")


def check_changed_data_flag(args: argparse.Namespace) -> None:
    if args.allow_changed_data and args.data:
        raise UserError("--allow-changed-data applies to the run's own data (no --data); --data PATH is new data anyway")
