"""Benchmark: peak RSS of `etft predict` over many synthetic windows (1M by default), to show it stays bounded.

1. trains a tiny run (one optimizer step: the weights do not matter here) on SYMBOLS synthetic symbols;
2. writes synthetic bars of the same symbols, as Parquet, for each size asked (windows = bars - warm-up -
   sequence_length + 1 per symbol);
3. runs `etft predict --data ... --out ....parquet` in a fresh process per size and reads that process's
   peak RSS from the kernel (os.wait4), with the wall time and the rows written.

What grows with the data is the input: the feature arrays (4 bytes x (features + calendar) per bar, or a
memory-mapped file with --memory-map-dir) and one symbol's bars while its features are made. The
predictions are streamed: one batch at a time, whatever the number of rows.

    python benchmarks/predict_memory.py [--windows 100000 1000000] [--work DIR] [--memory-map-dir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from enhanced_tft.data import features  # noqa: E402
from enhanced_tft.data.synthetic import generate_bars  # noqa: E402

SYMBOLS = 4
SEQUENCE_LENGTH = 24
BATCH_SIZE = 4096      # windows per prediction batch: the streamed part of the memory
# a small model: the benchmark is about memory over many rows, and 1M windows must pass in minutes on a CPU
RUN_YAML = f"""
seed: 1
data: {{num_symbols: {SYMBOLS}, num_bars: 400, sequence_length: {SEQUENCE_LENGTH}}}
model: {{d_model: 16, num_heads: 2, num_transformer_blocks: 1, ff_dim: 32, variable_hidden_size: 4}}
train: {{micro_batch_size: 64, epochs: 1, max_steps_per_epoch: 1}}
"""


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p))


def train_tiny_run(work: Path) -> Path:
    (work / "run.yaml").write_text(RUN_YAML)
    subprocess.run([sys.executable, "-m", "enhanced_tft.cli", "train", "--config", "run.yaml", "--log_dir", "logs"],
                   cwd=work, env=_env(), check=True, capture_output=True, text=True)
    return sorted((work / "logs").glob("training_*"))[-1]


def write_bars(path: Path, windows: int) -> int:
    """Bars of SYMBOLS symbols giving `windows` prediction windows in all; returns the bar count."""
    warmup = features.warmup_bars([1, 2, 3, 5, 10, 20], [10, 30])
    per_symbol = -(-windows // SYMBOLS) + warmup + SEQUENCE_LENGTH - 1
    generate_bars(SYMBOLS, per_symbol, seed=2).to_parquet(path, index=False)
    return per_symbol * SYMBOLS


def measure_predict(run: Path, data: Path, out: Path, extra: list[str]) -> dict:
    """One `etft predict` process: its wall time and peak RSS (the kernel's figure for that child alone)."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "enhanced_tft.cli", "predict", "--run", str(run), "--data",
                                str(data), "--out", str(out), "--batch-size", str(BATCH_SIZE), *extra], env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"etft predict failed ({process.returncode}):\n{stderr[-2000:]}")
    import pyarrow.parquet as pq
    return {"wall_s": time.perf_counter() - started, "peak_rss_mib": usage.ru_maxrss / 1024,
            "rows_written": pq.ParquetFile(out).metadata.num_rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--memory-map-dir", help="pass data.memory_map_dir: features in a memory-mapped file")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    holder = None if args.work else tempfile.TemporaryDirectory(prefix="etft_predict_memory_")
    work = args.work or Path(holder.name)
    work.mkdir(parents=True, exist_ok=True)
    extra = ["--set", f"data.memory_map_dir={args.memory_map_dir}"] if args.memory_map_dir else []
    run = train_tiny_run(work)
    rows = []
    print(f"{'windows':>10} {'bars':>10} {'rows written':>13} {'wall s':>8} {'peak RSS MiB':>13}")
    for windows in sorted(args.windows):
        data, out = work / f"bars_{windows}.parquet", work / f"predictions_{windows}.parquet"
        bars = write_bars(data, windows)
        result = {"windows": windows, "bars": bars, **measure_predict(run, data, out, extra)}
        rows.append(result)
        print(f"{windows:>10,} {bars:>10,} {result['rows_written']:>13,} {result['wall_s']:>8.1f} "
              f"{result['peak_rss_mib']:>13.0f}", flush=True)
        data.unlink()
        out.unlink()
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        slope = (last["peak_rss_mib"] - first["peak_rss_mib"]) * 2**20 / (last["bars"] - first["bars"])
        print(f"growth: {slope:.0f} bytes of peak RSS per extra bar of input (the feature arrays); the streamed "
              "output adds none")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2))
    if holder:
        holder.cleanup()


if __name__ == "__main__":
    main()
