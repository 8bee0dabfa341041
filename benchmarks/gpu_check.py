"""GPU check (one prepared script, a few minutes on one GPU): real peaks and speed against `etft plan`.

1. seed_original (64 observed inputs) and seed_v2_1 at fp32, bf16 and fp16: measured peak allocated
   bytes and train samples/s of real training steps beside the plan's prediction.
2. The full-size seed_original at effective batch 128, with the process capped to a 24 GB and to an
   8 GB card (torch.cuda.set_per_process_memory_fraction) and the micro-batch the plan picks for that cap.
3. A forced OOM (an oversized micro-batch under a tight cap) that the trainer's recovery survives.

    python benchmarks/gpu_check.py [--out gpu_check.json]

Prints one table and writes JSON. Needs a CUDA GPU; exits 2 without one.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from enhanced_tft import tasks  # noqa: E402
from enhanced_tft.config.schema import load_config, update  # noqa: E402
from enhanced_tft.data.pipeline import build_data  # noqa: E402
from enhanced_tft.model.build import build_training_model  # noqa: E402
from enhanced_tft.model.build import dims_for  # noqa: E402
from enhanced_tft.runtime.memory import release_memory  # noqa: E402
from enhanced_tft.runtime.precision import PrecisionPolicy  # noqa: E402
from enhanced_tft.training.optim import param_groups  # noqa: E402
from enhanced_tft.training.plan_report import plan_dims  # noqa: E402
from enhanced_tft.training.planner import fit_budget, trace_step  # noqa: E402
from enhanced_tft.training.trainer import Trainer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
DEVICE = torch.device("cuda")


def train_steps(cfg, dims, micro_batch: int, precision: str, steps: int = 6, warmup: int = 2) -> dict:
    """Real optimizer steps (micro-batches x accumulation) on random inputs; peak bytes and samples/s.

    The model runs as training runs it on the GPU: the CPU fast paths off (their default there), as in the plan.
    """
    torch.manual_seed(0)
    task = tasks.for_config(cfg)
    model = build_training_model(cfg, task, dims, DEVICE).train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-3)
    policy = PrecisionPolicy(precision, "gpu check", "cuda")
    scaler = policy.grad_scaler()
    accumulation = cfg.train.samples_per_step // micro_batch
    length = cfg.data.sequence_length
    observed = torch.randn(micro_batch, length, dims.num_observed, device=DEVICE)
    known = torch.randn(micro_batch, length + dims.horizon, dims.num_known, device=DEVICE)
    symbol = torch.zeros(micro_batch, dtype=torch.int64, device=DEVICE)
    target = torch.rand(micro_batch, device=DEVICE).round()
    started = None
    torch.cuda.reset_peak_memory_stats(DEVICE)
    for step in range(steps + warmup):
        if step == warmup:
            torch.cuda.synchronize(DEVICE)
            started = time.perf_counter()
        for _ in range(accumulation):
            with policy.autocast():
                output = model(observed, known, symbol).output
            loss = task.loss(output, target).sum() / (micro_batch * accumulation)
            scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize(DEVICE)
    seconds = time.perf_counter() - started
    result = {"peak_bytes": int(torch.cuda.max_memory_allocated(DEVICE)),
              "reserved_bytes": int(torch.cuda.max_memory_reserved(DEVICE)),
              "samples_per_s": steps * cfg.train.samples_per_step / seconds}
    del model, optimizer, scaler, output, loss, observed, known, symbol, target
    release_memory(DEVICE)
    return result


def capped(fraction_bytes: int):
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, fraction_bytes / total), DEVICE)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible; nothing to measure", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(DEVICE)
    total = torch.cuda.get_device_properties(DEVICE).total_memory
    print(f"device: {name}, {total / GIB:.1f} GiB, torch {torch.__version__}")
    rows = []
    configs = [("seed_original", load_config(REPO / "configs/seed_original.yaml"), 64),
               ("seed_v2_1", load_config(REPO / "configs/seed_v2_1.yaml"), None)]
    precisions = ["fp32", "bf16", "fp16"] if torch.cuda.is_bf16_supported() else ["fp32", "fp16"]
    for label, cfg, features in configs:
        dims = plan_dims(cfg, features)
        for precision in precisions:
            micro = cfg.train.micro_batch_size
            planned = trace_step(cfg, dims, micro, precision, "none").peak_bytes
            measured = train_steps(cfg, dims, micro, precision)
            rows.append({"case": f"{label} {precision}", "micro_batch": micro, "planned_bytes": planned, **measured,
                         "plan_error": planned / measured["peak_bytes"] - 1})

    original, dims = configs[0][1], plan_dims(configs[0][1], 64)
    for cap_gib in (24, 8):
        fit = fit_budget(original, dims, cap_gib * GIB, "bf16", "none", probe=16)
        if fit.micro_batch_size < 1:
            rows.append({"case": f"seed_original capped {cap_gib} GB", "micro_batch": 0, "planned_bytes": 0,
                         "peak_bytes": 0, "reserved_bytes": 0, "samples_per_s": 0.0, "status": "plan: does not fit"})
            continue
        capped(cap_gib * GIB)
        cfg = update(original, train={"micro_batch_size": fit.micro_batch_size,
                                      "gradient_accumulation_steps": fit.gradient_accumulation_steps})
        try:
            measured = train_steps(cfg, dims, fit.micro_batch_size, "bf16", steps=3, warmup=1)
            status = "trained"
        except torch.OutOfMemoryError:
            measured, status = {"peak_bytes": 0, "reserved_bytes": 0, "samples_per_s": 0.0}, "OOM"
        release_memory(DEVICE)
        rows.append({"case": f"seed_original capped {cap_gib} GB", "micro_batch": fit.micro_batch_size,
                     "planned_bytes": fit.predicted_peak_bytes, **measured, "status": status,
                     "max_micro_batch": fit.max_micro_batch})
        capped(total)

    # forced OOM: a micro-batch far beyond a 2 GiB cap; recovery must halve until it fits and finish
    cfg = update(load_config(REPO / "configs/seed_original.yaml"),
                 data={"num_symbols": 4, "num_bars": 3000},
                 train={"micro_batch_size": 4096, "gradient_accumulation_steps": 1, "epochs": 1,
                        "max_steps_per_epoch": 2, "mixed_precision": "bf16"})
    data = build_data(cfg)
    torch.manual_seed(0)
    model = build_training_model(cfg, tasks.for_config(cfg), dims_for(data.transform), DEVICE)
    capped(2 * GIB)
    trainer = Trainer(model, data, cfg, DEVICE, PrecisionPolicy("bf16", "gpu check", "cuda"), seed=0)
    try:
        result = trainer.fit()
        rows.append({"case": "forced OOM, 2 GiB cap", "micro_batch": result.micro_batch_size, "planned_bytes": 0,
                     "peak_bytes": result.peak_memory_bytes, "reserved_bytes": 0,
                     "samples_per_s": result.samples_per_s, "status": f"survived {result.oom_recoveries} OOMs"})
    finally:
        trainer.close()
        capped(total)

    print(f"{'case':<30}{'micro':>7}{'planned GiB':>13}{'peak GiB':>10}{'reserved':>10}{'error':>8}{'samples/s':>11}  status")
    for r in rows:
        error = f"{r['plan_error']:+.1%}" if "plan_error" in r else ""
        print(f"{r['case']:<30}{r['micro_batch']:>7}{r['planned_bytes'] / GIB:>13.3f}{r['peak_bytes'] / GIB:>10.3f}"
              f"{r['reserved_bytes'] / GIB:>10.3f}{error:>8}{r['samples_per_s']:>11.0f}  {r.get('status', '')}")
    Path(args.out).write_text(json.dumps({"device": name, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
