"""`etft export`: a finished run's members as ONNX files, with its transform and a manifest, for serving without torch."""
from __future__ import annotations

import argparse


def add_parser(commands) -> None:
    export = commands.add_parser("export", help="a finished run's members as ONNX files, with its transform and a "
                                 "manifest (SHA-256 of each file), for serving without torch")
    export.add_argument("--run", required=True, metavar="RUN_DIR", help="a finished run folder (logs/training_...)")
    export.add_argument("--format", choices=("onnx",), default="onnx", help="the file format (default: onnx)")
    export.add_argument("--out", metavar="DIR", help="the export folder (default: RUN_DIR/onnx)")
    export.add_argument("--overwrite", action="store_true", help="replace an export in --out (default: refuse)")


def run(args: argparse.Namespace) -> int:
    from ..serving.export import export_run
    print(export_run(args.run, args.out, args.overwrite))
    return 0
