"""`etft report`: (re)build a run folder's report.html from its files."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def add_parser(commands) -> None:
    report = commands.add_parser("report", help="(re)build report.html of a run folder from its files")
    report.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder (logs/training_...)")


def run(args: argparse.Namespace) -> int:
    from ..report.page import write_report
    if not Path(args.run).is_dir():
        raise UserError(f"--run {args.run!r} is not a folder; give a run folder like logs/training_20261128_101500")
    print(write_report(args.run))
    return 0
