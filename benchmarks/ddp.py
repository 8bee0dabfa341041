"""Data-parallel training on this machine: host memory and speed of `etft train` as 1 process, and as 1 and 2
torchrun ranks (gloo), on synthetic data large enough for its arrays to matter.

Memory is sampled every 0.2 s over the whole process tree (launcher and workers): the sum of RSS (every
process counts each page it maps, shared or not) and of PSS (a shared page split between its users: what the
machine really holds). Speed is summary.json's train samples/s. Table on stdout, rows as JSON with --json.

    .venv/bin/python benchmarks/ddp.py [--num-bars 200000] [--json docs/ddp.json]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        todo += _children(current)
    return pids


def _memory(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in bytes; (0, 0) once it is gone."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in rollup[1:] if line.split()[1].isdigit()}
    return values.get("Rss", 0), values.get("Pss", 0)


def measure(command: list[str], cwd: Path, env: dict) -> dict:
    """Run `command`, sampling the memory of its process tree; peak sums, wall time, the run's summary."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peaks = {"rss": 0, "pss": 0}

    def sample() -> None:
        while process.poll() is None:
            figures = [_memory(p) for p in _tree(process.pid)]
            peaks["rss"] = max(peaks["rss"], sum(f[0] for f in figures))
            peaks["pss"] = max(peaks["pss"], sum(f[1] for f in figures))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}):\n{stderr[-3000:]}")
    (run,) = (cwd / "logs").glob("training_*")
    summary = json.loads((run / "summary.json").read_text())
    return {"peak_rss_bytes": peaks["rss"], "peak_pss_bytes": peaks["pss"], "wall_s": time.perf_counter() - started,
            "train_samples_per_s": summary["samples_per_s"], "test": summary["test"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-bars", type=int, default=200_000, help="bars per symbol (10 symbols)")
    parser.add_argument("--num-features", type=int, default=64, help="observed inputs")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (one epoch)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows here")
    args = parser.parse_args()
    extra = args.num_features - 13   # the pipeline makes 13 features from OHLCV bars
    sets = ["--set", "data.num_symbols=10", "--set", f"data.num_bars={args.num_bars}", "--set",
            f"data.num_extra_features={extra}", "--set", "train.epochs=1", "--set",
            f"train.max_steps_per_epoch={args.steps}", "--set", "train.mixed_precision=fp32",
            # small validation and test splits: the arrays are the point here, not hours of scoring
            "--set", "data.val_fraction=0.005", "--set", "data.test_fraction=0.005"]
    etft = [sys.executable, "-m", "enhanced_tft.cli", "train", *sets, "--log_dir", "logs"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    rows = []
    for name, command, threads in (
            ("1 process", etft, "2"),
            ("torchrun, 1 rank", [*torchrun, "--nproc-per-node=1", "-m", "enhanced_tft.cli", *etft[3:]], "2"),
            ("torchrun, 2 ranks", [*torchrun, "--nproc-per-node=2", "-m", "enhanced_tft.cli", *etft[3:]], "1")):
        with tempfile.TemporaryDirectory() as folder:
            env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=threads)
            print(f"{name}: running ...", file=sys.stderr, flush=True)
            rows.append({"run": name, "threads_per_process": int(threads), **measure(command, Path(folder), env)})
    base = rows[0]
    print(f"{'run':<20}{'peak RSS MiB':>14}{'peak PSS MiB':>14}{'PSS / 1 proc':>14}{'train/s':>10}{'wall s':>8}")
    for r in rows:
        print(f"{r['run']:<20}{r['peak_rss_bytes'] / 2**20:>14.0f}{r['peak_pss_bytes'] / 2**20:>14.0f}"
              f"{r['peak_pss_bytes'] / base['peak_pss_bytes']:>14.2f}{r['train_samples_per_s']:>10.0f}{r['wall_s']:>8.0f}")
    print(f"data: 10 symbols x {args.num_bars} bars, {args.num_features} observed inputs "
          f"({10 * args.num_bars * args.num_features * 4 / 2**20:.0f} MiB of float32 features); {args.steps} steps")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
