"""Benchmark: `etft plan`'s predicted peak of one training step against the peak measured on real tensors.

The measurement runs a real CPU training step (forward, backward, AdamW step) under PyTorch's own
MemTracker (torch.distributed._tools.mem_tracker), an instrument independent of the planner's tracer.
The plan traces the step a GPU runs, with the model's CPU fast paths off (model/layers.py); the measured
step turns them off too, so that both count the same tensors.
Prints a table and writes JSON:  python benchmarks/plan_vs_measured.py [--out plan_vs_measured.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.distributed._tools.mem_tracker import MemTracker

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from enhanced_tft import tasks  # noqa: E402
from enhanced_tft.config.schema import load_config  # noqa: E402
from enhanced_tft.model.build import build_model  # noqa: E402
from enhanced_tft.model.layers import set_fast_cpu_kernels  # noqa: E402
from enhanced_tft.model.tft import ModelDims, set_activation_checkpointing  # noqa: E402
from enhanced_tft.training.optim import param_groups  # noqa: E402
from enhanced_tft.training.plan_report import plan_dims  # noqa: E402
from enhanced_tft.training.planner import trace_step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = [  # (name, config file, overrides, observed features or None)
    ("default", "configs/default.yaml", [], None),
    ("seed_v2_1", "configs/seed_v2_1.yaml", ["train.micro_batch_size=32"], None),
    ("seed_original F64", "configs/seed_original.yaml", [], 64),
]
OPTIONS = [("fp32", "none"), ("fp32", "blocks"), ("bf16", "none"), ("bf16", "all")]


def measure(cfg, dims: ModelDims, micro_batch: int, precision: str, checkpointing: str) -> int:
    """Peak bytes of one real training step on the CPU, as MemTracker sees them, with the fast paths off
    as in the plan."""
    torch.manual_seed(0)
    task = tasks.for_config(cfg)
    model = set_fast_cpu_kernels(build_model(cfg.model, dims, task.output_size), False)
    model = set_activation_checkpointing(model, checkpointing).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-3, foreach=True)
    for p in model.parameters():   # moments exist from the first step on, as in the plan
        p.grad = torch.zeros_like(p)
    optimizer.step()
    accumulating = cfg.train.gradient_accumulation_steps > 1
    if not accumulating:
        optimizer.zero_grad(set_to_none=True)
    steps = cfg.data.sequence_length
    observed = torch.randn(micro_batch, steps, dims.num_observed)
    known = torch.randn(micro_batch, steps + dims.horizon, dims.num_known)
    symbol = torch.zeros(micro_batch, dtype=torch.int64)
    target = torch.zeros(micro_batch)
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            output = model(observed, known, symbol).output
        loss = task.loss(output, target).sum() / micro_batch
        loss.backward()
        del loss, output
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")
    return int(sum(v["Total"] for v in peak.values()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="plan_vs_measured.json")
    args = parser.parse_args()
    rows = []
    print(f"{'config':<20}{'micro':>6}  {'precision':<10}{'ckpt':<8}{'planned MiB':>12}{'measured MiB':>13}{'error':>8}")
    for name, path, overrides, features in CASES:
        cfg = load_config(REPO / path, overrides)
        dims = plan_dims(cfg, features)
        for precision, checkpointing in OPTIONS:
            started = time.perf_counter()
            planned = trace_step(cfg, dims, cfg.train.micro_batch_size, precision, checkpointing).peak_bytes
            measured = measure(cfg, dims, cfg.train.micro_batch_size, precision, checkpointing)
            error = planned / measured - 1.0
            rows.append({"config": name, "micro_batch": cfg.train.micro_batch_size, "precision": precision,
                         "checkpointing": checkpointing, "planned_bytes": planned, "measured_bytes": measured,
                         "relative_error": error, "seconds": time.perf_counter() - started})
            print(f"{name:<20}{cfg.train.micro_batch_size:>6}  {precision:<10}{checkpointing:<8}{planned / 2**20:>12.1f}"
                  f"{measured / 2**20:>13.1f}{error:>+8.1%}")
    worst = max(abs(r["relative_error"]) for r in rows)
    print(f"largest |error|: {worst:.1%}")
    Path(args.out).write_text(json.dumps({"rows": rows, "max_abs_relative_error": worst}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
