"""Data path alone: peak RSS and batch speed of building windows and gathering batches, no model.

    .venv/bin/python benchmarks/data_path.py [--json out.json] [--quick]

Cases (each in a fresh child process, so that its peak RSS is its own):
  synthetic_10M  10,000,000 rows x 64 observed features (13 from OHLCV + 51 extra inputs), 100 symbols
  synthetic_10M_mmap  the same, features in a memory-mapped file (data.memory_map_dir)
  csv_300k       a 300,000-row CSV of 9 symbols (written first), through the file loader and its checks
Goals (issue 4): peak RSS under 2x the raw float32 feature array; batches served at least 20x faster than
the model trains (the default job trains at a few hundred samples/s on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CASES = {
    "synthetic_10M": {"num_symbols": 100, "num_bars": 100_000, "num_extra_features": 51},
    "synthetic_10M_mmap": {"num_symbols": 100, "num_bars": 100_000, "num_extra_features": 51, "mmap": True},
    "csv_300k": {"csv_symbols": 9, "csv_rows": 300_000},
}
QUICK = {"synthetic_10M": {"num_symbols": 10, "num_bars": 20_000, "num_extra_features": 51},
         "synthetic_10M_mmap": {"num_symbols": 10, "num_bars": 20_000, "num_extra_features": 51, "mmap": True},
         "csv_300k": {"csv_symbols": 9, "csv_rows": 30_000}}
BATCH = 64
SEQUENCE_LENGTH = 60


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(name: str, spec: dict) -> dict:
    import torch

    from enhanced_tft.config import build_config
    from enhanced_tft.data.pipeline import build_data

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    data = {"sequence_length": SEQUENCE_LENGTH}
    tmp = tempfile.mkdtemp(prefix="etft_bench_")
    if "csv_rows" in spec:
        from enhanced_tft.data.synthetic import generate_bars
        per_symbol = spec["csv_rows"] // spec["csv_symbols"]
        path = Path(tmp) / "bars.csv"
        generate_bars(spec["csv_symbols"], per_symbol, seed=1).to_csv(path, index=False)
        data.update(source="file", path=str(path))
        rss_before = _peak_rss_bytes()   # writing the CSV is not the data path: its peak is reported apart
    else:
        data.update(num_symbols=spec["num_symbols"], num_bars=spec["num_bars"],
                    num_extra_features=spec["num_extra_features"])
        if spec.get("mmap"):
            data["memory_map_dir"] = tmp
        rss_before = 0
    cfg = build_config({"data": data})
    started = time.perf_counter()
    bundle = build_data(cfg)
    build_seconds = time.perf_counter() - started
    observed = bundle.splits["train"].arrays.observed
    raw_bytes = observed.numel() * 4
    train = bundle.splits["train"]
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train), generator=generator)
    batches = min(2000, len(train) // BATCH)
    for i in range(20):   # warm-up
        train.batch(order[i * BATCH:(i + 1) * BATCH])
    started = time.perf_counter()
    for i in range(batches):
        batch = train.batch(order[i * BATCH:(i + 1) * BATCH])
    gather_seconds = time.perf_counter() - started
    assert batch["observed"].shape == (BATCH, SEQUENCE_LENGTH, observed.shape[1])
    peak = _peak_rss_bytes()
    return {"case": name, "rows": int(observed.shape[0]), "features": int(observed.shape[1]),
            "symbols": len(bundle.symbols), "raw_feature_bytes": raw_bytes, "build_seconds": build_seconds,
            "peak_rss_bytes": peak, "peak_rss_over_raw": peak / raw_bytes,
            "csv_writing_peak_rss_bytes": rss_before or None,
            "batches_per_s": batches / gather_seconds, "samples_per_s": batches * BATCH / gather_seconds,
            "memory_mapped": bool(spec.get("mmap"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run, not the benchmark)")
    parser.add_argument("--case", help=argparse.SUPPRESS)   # child process: run one case, print its JSON row
    args = parser.parse_args()
    cases = QUICK if args.quick else CASES
    if args.case:
        print(json.dumps(run_case(args.case, cases[args.case])))
        return 0
    rows = []
    for name in cases:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--case", name] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    header = f"{'case':<20}{'rows':>12}{'feat':>6}{'raw MiB':>9}{'build s':>9}{'peak RSS MiB':>14}{'RSS/raw':>9}{'batches/s':>11}{'samples/s':>11}"
    print(header)
    for r in rows:
        print(f"{r['case']:<20}{r['rows']:>12,}{r['features']:>6}{r['raw_feature_bytes'] / 2**20:>9.0f}"
              f"{r['build_seconds']:>9.1f}{r['peak_rss_bytes'] / 2**20:>14.0f}{r['peak_rss_over_raw']:>9.2f}"
              f"{r['batches_per_s']:>11.0f}{r['samples_per_s']:>11.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
