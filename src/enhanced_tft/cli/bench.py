"""`etft bench`: its arguments, then the measurements of training/bench.py."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..config import schema as config_mod
from ..errors import UserError

log = logging.getLogger("enhanced_tft.bench")


def add_parser(commands) -> None:
    bench = commands.add_parser(
        "bench", help="measure training/inference samples/s, saved activations and peak memory of configs")
    bench.add_argument("--config", nargs="+", metavar="FILE",
                       help="YAML config(s), each a row group named by its file stem (default: built-in defaults)")
    bench.add_argument("--num_features", "--num-features", dest="num_features", nargs="+", type=int, metavar="N",
                       help="observed input counts of the synthetic data (default: what the data section makes)")
    bench.add_argument("--precision", nargs="+", default=["fp32"], metavar="P",
                       help="fp32, bf16 and/or fp16 (fp16 on a CPU runs bf16; the row says what ran); default fp32")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a value of every config, e.g. --set train.compile=true (repeatable)")
    bench.add_argument("--json", nargs="?", const="-", metavar="PATH",
                       help="also write the rows as a JSON list to PATH (no PATH: to stdout, instead of the table)")
    bench.add_argument("--overwrite", action="store_true", help="let --json PATH replace an existing file")
    bench.add_argument("--repeats", type=int, default=5, help="timed repeats per row; the row reports the median")
    bench.add_argument("--warmup", type=int, default=3, help="optimizer steps before timing (not counted)")
    bench.add_argument("--seconds", type=float, default=3.0, help="about this long per timed repeat of training "
                       "(inference's repeats: two thirds of it)")
    bench.add_argument("--threads", type=int, metavar="N",
                       help="torch intra-op threads (default: the CPUs this process may use)")


def load_configs(files: list[str] | None, overrides: list[str]) -> list[tuple[str, config_mod.Config]]:
    if not files:
        return [("default", config_mod.load_config(None, overrides))]
    named = []
    for file in files:
        named.append((Path(file).stem, config_mod.load_config(file, overrides)))
    return named


def run(args: argparse.Namespace) -> int:
    configs = load_configs(args.config, args.overrides)
    from ..training.bench import BenchSettings, validate_request

    # --seconds sizes inference's repeats too (they ignored it and lasted 2 s whatever was asked)
    settings = BenchSettings(repeats=args.repeats, warmup_steps=args.warmup, seconds_per_repeat=args.seconds,
                             infer_seconds=args.seconds * 2 / 3)
    validate_request(args.num_features, args.precision, settings)
    from ..training.bench import check_json_target
    check_json_target(args.json, args.overwrite)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads={args.threads}; allowed: an integer >= 1")

    from ..runtime.precision import resolve_device
    from ..runtime.threads import configure_threads
    from ..training.bench import format_table, run_bench, write_json
    threads = configure_threads(args.threads)
    device = resolve_device(configs[0][1].train.device)
    log.info("bench on %s, %d threads: %s x features %s x %s", device, threads, ", ".join(n for n, _ in configs),
             args.num_features or "as configured", ", ".join(args.precision))
    rows = run_bench(configs, args.num_features, args.precision, settings, device, progress=log.info)
    if args.json == "-":
        write_json(rows, "-")
    else:
        print(format_table(rows))
        if args.json:
            write_json(rows, args.json)
            print(f"rows written to {args.json}", file=sys.stderr)
    return 0
