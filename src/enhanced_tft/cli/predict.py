"""`etft predict`: a saved run's predictions of a split or of new bars, streamed to a Parquet or CSV file."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..errors import UserError
from ..runs import PREDICTIONS_DEFAULT
from ..runtime.threads import configure_threads
from .common import add_prediction_arguments, check_changed_data_flag

log = logging.getLogger("enhanced_tft.cli")


def add_parser(commands) -> None:
    predict = commands.add_parser("predict", help="predictions of a saved run, streamed to a Parquet or CSV file")
    add_prediction_arguments(predict)
    predict.add_argument("--out", metavar="FILE", help="output .parquet, .csv or .csv.gz (default: RUN_DIR/predictions.parquet)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    predict.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                         help="torch (default), or onnx: the run's ONNX export (etft export) by ONNX Runtime on the CPU")


def run(args: argparse.Namespace) -> int:
    from ..serving.predict import TableWriter, open_prediction, predict_to_file
    out = Path(args.out) if args.out else Path(args.run) / PREDICTIONS_DEFAULT
    TableWriter(out)   # checks the file ending before any work
    if out.exists() and not args.overwrite:
        raise UserError(f"--out {str(out)!r} already exists; give another --out, or add --overwrite to replace it")
    if not out.parent.is_dir():
        raise UserError(f"--out {str(out)!r}: folder {str(out.parent)!r} does not exist")
    check_changed_data_flag(args)
    configure_threads()   # the CPUs this process may use, as in training
    job = open_prediction(args.run, args.data, args.split, args.overrides, args.batch_size, args.device,
                          args.allow_changed_data)
    started = time.time()
    rows = predict_to_file(job.run, job.windows, job.target_known, out, job.device, job.policy, job.batch_size,
                           args.engine)
    log.info("wrote %d predictions to %s in %.1f s", rows, out, time.time() - started)
    print(out)
    return 0
