"""Benchmark: inference samples/s of ONNX Runtime against PyTorch on the CPU, and the size of an exported ensemble.

For each config (default: configs/default.yaml and configs/bench_matched.yaml):
1. trains a run of MEMBERS members, one optimizer step each (the weights do not change the speed);
2. exports it (`etft export`) and records the export's time and its size on disk;
3. times both engines on the same batches of model inputs: torch as `etft predict --engine torch` runs a batch
   (eval mode, no_grad, fast CPU kernels, every member, the task's predict), ONNX Runtime as `--engine onnx` and
   the torch-free serving path run it (serve.OnnxModel.run_members). Both get the same CPU threads.

    python benchmarks/onnx_speed.py [--configs configs/default.yaml ...] [--members 3] [--batch-sizes 1 128 1024]
                                    [--seconds 3] [--threads N] [--json] [--work DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from enhanced_tft.cli import main as etft  # noqa: E402
from enhanced_tft.runtime.threads import available_cpus  # noqa: E402
from enhanced_tft.serving.onnx_model import OnnxModel  # noqa: E402
from enhanced_tft.serving.saved_run import SavedRun  # noqa: E402

CONFIGS = ("configs/default.yaml", "configs/bench_matched.yaml")


def train_and_export(config: str, members: int, work: Path) -> tuple[Path, float]:
    """A run of `config` (one optimizer step per member; one that --work already holds is reused) and its export;
    returns the run and the export's seconds."""
    log_dir = work / f"{Path(config).stem}_{members}"
    with contextlib.redirect_stdout(sys.stderr):   # stdout carries the table (or the JSON) alone
        if not list(log_dir.glob("training_*")):
            code = etft(["train", "--config", str(REPO / config), "--log_dir", str(log_dir), "--ensemble_size",
                         str(members), "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1", "--set",
                         "train.device=cpu", "--set", "train.strong_baseline=false"])
            if code != 0:
                raise SystemExit(f"training {config} failed (exit {code})")
        (run,) = log_dir.glob("training_*")
        started = time.perf_counter()
        if etft(["export", "--run", str(run), "--overwrite"]) != 0:
            raise SystemExit(f"exporting {config} failed")
    return run, time.perf_counter() - started


def inputs_of(run: SavedRun, batch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs of one batch: scaled features ~ N(0, 1), calendar values in [-1, 1], symbol ids."""
    transform, rng = run.transform, np.random.default_rng(0)
    length, horizon = transform.sequence_length, transform.horizon
    return (rng.standard_normal((batch, length, len(transform.features)), dtype=np.float32),
            rng.uniform(-1, 1, (batch, length + horizon, len(transform.known_features))).astype(np.float32),
            rng.integers(0, len(transform.symbols), batch, dtype=np.int64))


def samples_per_second(run_batch, batch: int, seconds: float) -> float:
    """Calls of `run_batch` for about `seconds` after one warm-up call; samples per second of wall time."""
    run_batch()
    calls, started = 0, time.perf_counter()
    while True:
        run_batch()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls * batch / elapsed


def measure(config: str, members: int, batch_sizes: list[int], seconds: float, threads: int, work: Path) -> dict:
    run_path, export_seconds = train_and_export(config, members, work)
    torch.set_num_threads(threads)   # after `etft train`, which sets torch's threads to every available CPU
    run = SavedRun.open(run_path)
    models, task = run.load_models(torch.device("cpu")), run.task
    onnx = OnnxModel.open(run_path / "onnx", threads=threads)
    folder = run_path / "onnx"
    member_bytes = sum((folder / name).stat().st_size for name in onnx.manifest["members"])
    rows = []
    for batch in batch_sizes:
        arrays = inputs_of(run, batch)
        tensors = [torch.from_numpy(a) for a in arrays]

        def torch_batch():
            with torch.no_grad():
                return [task.predict(model(*tensors).output) for model in models]

        rows.append({"batch": batch, "torch_samples_per_s": samples_per_second(torch_batch, batch, seconds),
                     "onnx_samples_per_s": samples_per_second(lambda: onnx.run_members(*arrays), batch, seconds)})
    return {"config": config, "members": members, "sequence_length": run.transform.sequence_length,
            "d_model": run.cfg.model.d_model, "parameters_per_member": sum(p.numel() for p in models[0].parameters()),
            "export_seconds": export_seconds, "export_bytes": sum(f.stat().st_size for f in folder.iterdir()),
            "member_bytes": member_bytes, "threads": threads, "rows": rows}


def format_table(results: list[dict]) -> str:
    lines = [f"{'config':<22}{'members':>8}{'batch':>7}{'torch samples/s':>17}{'onnx samples/s':>16}{'onnx/torch':>12}"]
    for result in results:
        for row in result["rows"]:
            lines.append(f"{Path(result['config']).name:<22}{result['members']:>8}{row['batch']:>7}"
                         f"{row['torch_samples_per_s']:>17,.0f}{row['onnx_samples_per_s']:>16,.0f}"
                         f"{row['onnx_samples_per_s'] / row['torch_samples_per_s']:>11.2f}x")
    lines.append("")
    lines.append(f"{'config':<22}{'params/member':>14}{'export s':>10}{'members MB':>12}{'export folder MB':>18}")
    for result in results:
        lines.append(f"{Path(result['config']).name:<22}{result['parameters_per_member']:>14,}"
                     f"{result['export_seconds']:>10.1f}{result['member_bytes'] / 1e6:>12.2f}"
                     f"{result['export_bytes'] / 1e6:>18.2f}")
    lines.append(f"(CPU threads per engine: {results[0]['threads']}; torch {torch.__version__})")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS))
    parser.add_argument("--members", type=int, default=3, help="ensemble size of each exported run (default 3)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 128, 1024])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per engine and batch size")
    parser.add_argument("--threads", type=int, default=available_cpus(), help="CPU threads of each engine")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--work", help="folder for the runs, kept and reused by later calls (default: a temporary "
                        "folder, removed)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        results = [measure(c, args.members, args.batch_sizes, args.seconds, args.threads, work) for c in args.configs]
    print(json.dumps({"results": results}, indent=2) if args.json else format_table(results))


if __name__ == "__main__":
    main()
