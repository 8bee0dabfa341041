"""Data path alone: peak RSS and batch speed of building windows and gathering batches, no model.

    .venv/bin/python benchmarks/data_path.py [--json out.json] [--quick]
    .venv/bin/python benchmarks/data_path.py --loader [--csv-rows 2000000] [--loader-before OLD_SOURCES.py]

Cases (each in a fresh child process, so that its peak RSS is its own):
  synthetic_10M  10,000,000 rows x 64 observed features (13 from OHLCV + 51 extra inputs), 100 symbols
  synthetic_10M_mmap  the same, features in a memory-mapped file (data.memory_map_dir)
  csv_300k       a 300,000-row CSV of 9 symbols (written first), through the file loader and its checks
Goals (issue 4): peak RSS under 2x the raw float32 feature array; batches served at least 20x faster than
the model trains (the default job trains at a few hundred samples/s on 2 CPU cores).

--loader: the file loader alone (load_file_bars, no features) on a CSV of --csv-rows rows of 9 symbols: the
child's peak RSS (VmHWM) above its RSS once imports are done, against the bytes of the frame it returns. With
--loader-before FILE a second row runs FILE as the loader module, e.g. the loader of an earlier commit:
    git show HEAD~1:src/enhanced_tft/data/sources.py > /tmp/sources_before.py
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
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


def _proc_status_bytes(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process: per address space, so a child's starts at its own exec."""
    match = re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    return int(match.group(1)) * 1024


def run_loader(csv_path: str, sources_file: str | None) -> dict:
    """load_file_bars on `csv_path`, with this package's loader or the module in `sources_file`."""
    from enhanced_tft.config.schema import build_config
    if sources_file:   # a package module name, so that its relative imports resolve against enhanced_tft.data
        spec = importlib.util.spec_from_file_location("enhanced_tft.data.sources_under_test", sources_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        from enhanced_tft.data import sources as module
    data = build_config({"data": {"source": "file", "path": csv_path}}).data
    baseline = _proc_status_bytes("VmRSS")
    started = time.perf_counter()
    bars = module.load_file_bars(data)
    seconds = time.perf_counter() - started
    peak = _proc_status_bytes("VmHWM")
    frame_bytes = int(bars.memory_usage(deep=True).sum())
    return {"loader": sources_file or "this checkout", "rows": len(bars), "file_bytes": os.path.getsize(csv_path),
            "frame_bytes": frame_bytes, "baseline_rss_bytes": baseline, "peak_rss_bytes": peak,
            "peak_over_frame": (peak - baseline) / frame_bytes, "seconds": seconds}


def loader_main(args) -> int:
    from enhanced_tft.data.synthetic import generate_bars
    with tempfile.TemporaryDirectory(prefix="etft_bench_") as tmp:
        path = Path(tmp) / "bars.csv"
        print(f"writing {args.csv_rows:,} rows ...", file=sys.stderr, flush=True)
        generate_bars(9, args.csv_rows // 9, seed=1).to_csv(path, index=False)
        rows = []
        for sources_file in ([args.loader_before] if args.loader_before else []) + [None]:
            print(f"loading with {sources_file or 'this checkout'} ...", file=sys.stderr, flush=True)
            command = [sys.executable, __file__, "--loader-case", str(path)]
            command += ["--loader-before", sources_file] if sources_file else []
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mib = 2 ** 20
    print(f"{'loader':<40}{'rows':>12}{'file MiB':>10}{'frame MiB':>11}{'base MiB':>10}{'peak MiB':>10}"
          f"{'(peak-base)/frame':>19}{'s':>7}")
    for r in rows:
        print(f"{r['loader'][-40:]:<40}{r['rows']:>12,}{r['file_bytes'] / mib:>10.0f}{r['frame_bytes'] / mib:>11.0f}"
              f"{r['baseline_rss_bytes'] / mib:>10.0f}{r['peak_rss_bytes'] / mib:>10.0f}{r['peak_over_frame']:>19.2f}"
              f"{r['seconds']:>7.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def run_case(name: str, spec: dict) -> dict:
    import torch

    from enhanced_tft.config.schema import build_config
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
    parser.add_argument("--loader", action="store_true", help="measure the file loader alone (see above)")
    parser.add_argument("--csv-rows", type=int, default=2_000_000, help="rows of the --loader CSV")
    parser.add_argument("--loader-before", metavar="FILE", help="--loader: also run this sources.py")
    parser.add_argument("--loader-case", help=argparse.SUPPRESS)   # child process of --loader
    args = parser.parse_args()
    if args.loader_case:
        print(json.dumps(run_loader(args.loader_case, args.loader_before)))
        return 0
    if args.loader:
        return loader_main(args)
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
