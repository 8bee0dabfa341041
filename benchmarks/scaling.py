"""Scaling of training speed and memory with sequence_length, input features and d_model, around bench_matched.

Each row is an `etft bench` row (the same Trainer step, data path and definitions) with fewer repeats, so
that the whole sweep stays within about 10 minutes on 2 CPU cores. Writes, under --out (default docs/):
scaling.json (the rows), scaling.md (a markdown table) and, where matplotlib is installed, scaling_*.png.

    PYTHONPATH=src python benchmarks/scaling.py                     # measure, write table, JSON and plots
    python benchmarks/scaling.py --plot-only docs/scaling.json      # plots from saved rows (any venv with matplotlib)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEPS = {   # axis -> values; the other two stay at bench_matched's (length 60, 32 features, d_model 128)
    "sequence_length": [30, 60, 120, 240],
    "num_features": [16, 64, 256],
    "d_model": [64, 128, 256, 512],
}
BASE = {"sequence_length": 60, "num_features": 32, "d_model": 128}


def measure(out: Path, repeats: int, seconds: float) -> list[dict]:
    sys.path.insert(0, str(REPO / "src"))
    from enhanced_tft.runtime.threads import tune_host_allocator
    tune_host_allocator()     # as `etft` does, before torch is imported
    import torch

    from enhanced_tft.config.schema import load_config, update
    from enhanced_tft.data.pipeline import build_data
    from enhanced_tft.runtime.threads import configure_threads
    from enhanced_tft.training.bench import BenchSettings, bench_row, with_observed_features

    configure_threads()
    settings = BenchSettings(repeats=repeats, warmup_steps=1, seconds_per_repeat=seconds, infer_seconds=seconds)
    base_cfg = load_config(REPO / "configs" / "bench_matched.yaml")
    device = torch.device("cpu")
    rows, started = [], time.perf_counter()
    for axis, values in SWEEPS.items():
        for value in values:
            point = {**BASE, axis: value}
            d_model = point["d_model"]
            cfg = update(base_cfg, data={"sequence_length": point["sequence_length"]},
                         model={"d_model": d_model, "ff_dim": 2 * d_model, "num_heads": 8})
            data = build_data(with_observed_features(cfg, point["num_features"]))
            row = asdict(bench_row("bench_matched", cfg, data, "fp32", device, settings))
            row["axis"] = axis
            rows.append(row)
            logging.info("%s=%s: %.1f train samples/s, %.3f MiB saved/sample, peak %.0f MiB (%.0f s so far)", axis,
                         value, row["train_samples_per_s"], row["saved_bytes_per_sample"] / 2**20,
                         row["peak_memory_bytes"] / 2**20, time.perf_counter() - started)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| axis | sequence_length | features | d_model | params | train samples/s | infer samples/s "
             "| saved MiB/sample | step peak MiB |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['axis']} | {r['sequence_length']} | {r['num_features']} | {r['d_model']} | "
                     f"{r['params'] / 1e6:.2f} M | {r['train_samples_per_s']:.0f} | {r['infer_samples_per_s']:.0f} | "
                     f"{r['saved_bytes_per_sample'] / 2**20:.3f} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no plots (python benchmarks/scaling.py --plot-only "
                        "%s from an environment that has it)", out / "scaling.json")
        return []
    key = {"sequence_length": "sequence_length", "num_features": "num_features", "d_model": "d_model"}
    written = []
    for axis in SWEEPS:
        sweep = [r for r in rows if r["axis"] == axis]
        if not sweep:
            continue
        x = [r[key[axis]] for r in sweep]
        fig, (speed, memory) = plt.subplots(1, 2, figsize=(9, 3.4))
        speed.plot(x, [r["train_samples_per_s"] for r in sweep], "o-", label="train")
        speed.plot(x, [r["infer_samples_per_s"] / 10 for r in sweep], "s--", label="inference / 10")
        speed.set_xlabel(axis), speed.set_ylabel("samples/s"), speed.legend(), speed.set_xscale("log", base=2)
        memory.plot(x, [r["saved_bytes_per_sample"] / 2**20 for r in sweep], "o-", label="saved MiB/sample")
        memory.plot(x, [r["peak_memory_bytes"] / 2**30 for r in sweep], "s--", label="step peak GiB")
        memory.set_xlabel(axis), memory.legend(), memory.set_xscale("log", base=2)
        fig.suptitle(f"bench_matched, fp32, 2 CPU threads: {axis} varies")
        fig.tight_layout()
        path = out / f"scaling_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs"), help="folder of scaling.json, scaling.md and PNGs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="about this long per timed repeat")
    parser.add_argument("--plot-only", metavar="JSON", help="skip measuring: table and plots from saved rows")
    args = parser.parse_args()
    out = Path(args.out)
    if args.plot_only:
        rows = json.loads(Path(args.plot_only).read_text())
    else:
        rows = measure(out, args.repeats, args.seconds)
    (out / "scaling.md").write_text(table(rows))
    print(table(rows))
    for path in plots(rows, out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
