"""The arithmetic floor of a training step: FLOPs per sample against this machine's best matrix-product rate.

For each config: the FLOPs of one forward + backward per training sample (torch's FlopCounterMode for the
matrix products and attention; the LSTM, which FlopCounterMode does not count, from its formula
3 x 2 x 4 x (input + hidden) x hidden per step: forward, and backward at twice the forward), then the fastest
samples/s any implementation could reach if every FLOP ran at the best rate measured here for float32 matrix
products of the model's shapes, with nothing else costing time. A goal above that ceiling cannot be met by
faster code on this machine, only by less arithmetic (a smaller model) or faster arithmetic (another device).

    PYTHONPATH=src python benchmarks/flop_floor.py [--json flop_floor.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from enhanced_tft import tasks  # noqa: E402
from enhanced_tft.config.schema import load_config  # noqa: E402
from enhanced_tft.model.build import build_model  # noqa: E402
from enhanced_tft.model.tft import set_activation_checkpointing  # noqa: E402
from enhanced_tft.runtime.threads import configure_threads  # noqa: E402
from enhanced_tft.training.plan_report import plan_dims  # noqa: E402

CASES = [("bench_matched", 32), ("bench_matched", 128), ("seed_v2_1", 32), ("seed_original", 64)]


def flops_per_sample(config: str, num_features: int, batch: int = 8) -> dict:
    cfg = load_config(REPO / "configs" / f"{config}.yaml")
    dims = plan_dims(cfg, num_features)   # the observed inputs given, the pipeline's known (calendar) inputs
    torch.manual_seed(0)
    task = tasks.for_config(cfg)
    model = set_activation_checkpointing(build_model(cfg.model, dims, task.output_size),
                                         cfg.train.activation_checkpointing).train()
    length = cfg.data.sequence_length
    observed = torch.randn(batch, length, num_features)
    known = torch.randn(batch, length + dims.horizon, dims.num_known)
    symbol = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter:
        output = model(observed, known, symbol).output
        task.loss(output, torch.zeros(batch)).sum().backward()
    d_model, steps = cfg.model.d_model, length + dims.horizon
    lstm = 3 * 2 * 4 * (d_model + d_model) * d_model * steps * cfg.model.lstm_layers
    counted = counter.get_total_flops() / batch
    return {"config": config, "num_features": num_features, "counted_flops": counted, "lstm_flops": lstm,
            "flops_per_sample": counted + lstm}


def best_matmul_rate(seconds: float = 1.0) -> tuple[float, list[dict]]:
    """float32 matrix products of the model's shapes (rows = batch 64 x 61 steps) and one large one."""
    rows = []
    for m, k, n in [(3904, 128, 384), (3904, 256, 128), (3904, 128, 512), (3840, 576, 128), (2048, 2048, 2048)]:
        a, b = torch.randn(m, k), torch.randn(k, n)
        for _ in range(3):
            a @ b
        started, calls = time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            a @ b
            calls += 1
        rate = 2 * m * k * n * calls / (time.perf_counter() - started)
        rows.append({"m": m, "k": k, "n": n, "gflops": rate / 1e9})
    return max(r["gflops"] for r in rows) * 1e9, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    threads = configure_threads()
    rate, matmuls = best_matmul_rate()
    print(f"threads {threads}; float32 matrix products: "
          + ", ".join(f"{r['m']}x{r['k']}x{r['n']} {r['gflops']:.0f}" for r in matmuls) + " GFLOP/s")
    print(f"{'config':<16}{'F':>5}{'GFLOP/sample':>14}{'ceiling samples/s':>19}")
    rows = []
    for config, features in CASES:
        row = flops_per_sample(config, features)
        row["ceiling_samples_per_s"] = rate / row["flops_per_sample"]
        rows.append(row)
        print(f"{config:<16}{features:>5}{row['flops_per_sample'] / 1e9:>14.3f}{row['ceiling_samples_per_s']:>19.0f}")
    print(f"ceiling: every FLOP at the best rate above ({rate / 1e9:.0f} GFLOP/s), nothing else costing time")
    if args.json:
        Path(args.json).write_text(json.dumps({"threads": threads, "matmuls": matmuls, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
