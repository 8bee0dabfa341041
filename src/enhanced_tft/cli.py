"""`etft` command line: parse, build, run, always clean up. User errors exit 2 with one clear message."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Sequence

from tqdm.contrib.logging import logging_redirect_tqdm

from . import config as config_mod
from .config import ConfigError
from .run_commands import add_prediction_arguments, cmd_evaluate, cmd_predict, cmd_report

log = logging.getLogger("enhanced_tft.cli")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults = configs/default.yaml)")
    parser.add_argument("--task", choices=config_mod.TASKS, help="overrides the config's task")
    parser.add_argument("--test_mode", action="store_true",
                        help="the seed's smoke run: small data slice, small model, 2 epochs, full run folder")
    parser.add_argument("--ensemble_size", type=int, metavar="N", help="train N members with seeds seed..seed+N-1")
    parser.add_argument("--log_dir", metavar="DIR", help="parent of the run folders (default: logs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.d_model=64 (repeatable)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue a stopped run from its newest checkpoint (logs/training_...)")
    parser.add_argument("--data", metavar="PATH",
                        help="train on your OHLCV file (CSV, gzip CSV, Parquet): sets data.source=file and "
                             "data.path=PATH; other data.* keys via --set, e.g. --set data.columns='{timestamp: Date}'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etft", description="Enhanced TFT for market time series")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser("train", help="train a model (or an ensemble) and write a run folder")
    _add_train_arguments(train)
    train.add_argument("--auto_batch", action="store_true",
                       help="pick the largest micro-batch that fits (GPU memory, or --gpu-memory) and keep the effective batch")
    train.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", metavar="SIZE",
                       help="memory budget for --auto_batch, e.g. 24GiB (default: the GPU's total memory)")
    plan = commands.add_parser("plan", help="predict the memory of one training step before training (no GPU needed)")
    plan.add_argument("--config", metavar="FILE", help="YAML config (default: built-in defaults)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config value, e.g. --set train.batch_size=128 (repeatable)")
    plan.add_argument("--gpu-memory", "--gpu_memory", dest="gpu_memory", metavar="SIZE",
                      help="memory budget, e.g. 24GiB or 8GB: also find the largest micro-batch that fits")
    plan.add_argument("--num-features", "--num_features", dest="num_features", type=int, metavar="N",
                      help="observed input variables (default: what the config's data section produces)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    report = commands.add_parser("report", help="(re)build report.html of a run folder from its files")
    report.add_argument("--run", required=True, metavar="RUN_DIR", help="a run folder (logs/training_...)")
    predict = commands.add_parser("predict", help="predictions of a saved run, streamed to a Parquet or CSV file")
    add_prediction_arguments(predict)
    predict.add_argument("--out", metavar="FILE", help="output .parquet, .csv or .csv.gz (default: RUN_DIR/predictions.parquet)")
    predict.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    evaluate = commands.add_parser("evaluate", help="score a saved run on other data or a split, against the naive baselines")
    add_prediction_arguments(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    from .bench_cli import add_bench_parser
    add_bench_parser(commands)
    return parser


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = config_mod.load_config(args.config, args.overrides)
    budget = None
    from .train.planner import parse_bytes
    if args.gpu_memory:
        budget = parse_bytes(args.gpu_memory)
    if args.num_features is not None and args.num_features < 1:
        raise ValueError(f"--num-features={args.num_features}; allowed: an integer >= 1")
    from .plan_report import format_plan, plan_dims
    from .train.planner import plan
    result = plan(cfg, plan_dims(cfg, args.num_features), budget)
    print(json.dumps(result, indent=2) if args.json else format_plan(result))
    return 0


def _flag_overrides(args: argparse.Namespace) -> list[str]:
    """--set assignments, then the flags that are shorthands for config keys."""
    overrides = list(args.overrides)
    if args.task:
        overrides.append(f"task={args.task}")
    if args.ensemble_size is not None:
        overrides.append(f"train.ensemble_size={args.ensemble_size}")
    return overrides


def resolve_train_config(args: argparse.Namespace) -> config_mod.Config:
    raw = config_mod.load_yaml(args.config) if args.config else {}
    for assignment in _flag_overrides(args):
        config_mod.apply_override(raw, assignment)
    if getattr(args, "data", None):
        # set directly, not through --set: a path is not parsed as YAML (a name like `true` or `1e3.csv` stays text)
        section = raw.setdefault("data", {})
        if isinstance(section, dict):
            section.update(source="file", path=os.path.abspath(os.path.expanduser(args.data)))
    cfg = config_mod.build_config(raw)
    if args.log_dir:
        cfg = config_mod.update(cfg, run={"log_dir": args.log_dir})
    if args.test_mode:
        cfg = config_mod.apply_test_mode(cfg)
    return cfg


SAFE_RESUME_CHANGES = ("train.epochs", "train.early_stopping_patience", "train.log_every_steps",
                       "train.checkpoint_every_steps", "train.keep_checkpoints", "train.max_nonfinite_steps")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "columns":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_resume_config(args: argparse.Namespace):
    """The stopped run's own config, with only the changes that keep a resumed run exact."""
    from pathlib import Path

    folder = Path(args.resume)
    for flag, given in (("--config", args.config), ("--data", args.data), ("--test_mode", args.test_mode),
                        ("--auto_batch", args.auto_batch), ("--log_dir", args.log_dir)):
        if given:
            raise ValueError(f"{flag} cannot be combined with --resume: a resumed run keeps its own config and "
                             f"folder; allowed with --resume: --set for {', '.join(SAFE_RESUME_CHANGES)}")
    if not (folder / "config.yaml").is_file() or not (folder / "checkpoints").is_dir():
        raise ValueError(f"--resume {str(folder)!r} is not a run folder: it needs config.yaml and checkpoints/ "
                         "(a folder like logs/training_20261128_101500)")
    saved = config_mod.load_config(folder / "config.yaml")
    raw = saved.model_dump(mode="json")
    for assignment in _flag_overrides(args):
        config_mod.apply_override(raw, assignment)
    cfg = config_mod.build_config(raw)
    before, after = _flatten(saved.model_dump(mode="json")), _flatten(cfg.model_dump(mode="json"))
    changed = [k for k in after if before.get(k) != after[k]]
    unsafe = [k for k in changed if k not in SAFE_RESUME_CHANGES]
    if unsafe:
        listing = "; ".join(f"{k}: {before.get(k)!r} -> {after[k]!r}" for k in unsafe)
        raise ValueError(f"--resume: the config differs from the run's in a way that would change what was "
                         f"trained ({listing}); allowed changes: {', '.join(SAFE_RESUME_CHANGES)}")
    return cfg, folder, changed


def cmd_train(args: argparse.Namespace) -> int:
    if args.gpu_memory and not args.auto_batch:
        raise ValueError("--gpu-memory is the budget of --auto_batch; add --auto_batch, or use `etft plan --gpu-memory`")
    resuming = bool(args.resume)
    if resuming:
        cfg, folder, changed = resolve_resume_config(args)
    else:
        cfg, folder, changed = resolve_train_config(args), None, []
        if cfg.data.walk_forward_folds and cfg.data.fold is None:
            return _walk_forward(args, cfg)
    return _train_run(args, cfg, folder, changed)[0]


def _walk_forward(args: argparse.Namespace, cfg: config_mod.Config) -> int:
    """One run folder per fold, then the folds' test metrics side by side (and walk_forward_<time>.json)."""
    from pathlib import Path

    folds = cfg.data.walk_forward_folds
    results = []
    for fold in range(folds):
        log.info("walk-forward fold %d of %d", fold, folds)
        code, run_path = _train_run(args, config_mod.update(cfg, data={"fold": fold}), None, [])
        if code != 0:
            return code
        results.append({"fold": fold, "run": str(run_path),
                        "test": json.loads((run_path / "summary.json").read_text())["test"]})
    keys = [k for k, v in results[0]["test"].items() if isinstance(v, float)]
    mean = {k: sum(r["test"][k] for r in results) / folds for k in keys}
    lines = [f"walk-forward test metrics ({folds} folds):", "  fold" + "".join(f"{k:>20}" for k in keys)]
    lines += [f"  {r['fold']:<4}" + "".join(f"{r['test'][k]:>20.4f}" for k in keys) for r in results]
    lines.append("  mean" + "".join(f"{mean[k]:>20.4f}" for k in keys))
    out = Path(cfg.run.log_dir) / f"walk_forward_{Path(results[0]['run']).name.removeprefix('training_')}.json"
    from .runs import write_text_atomic
    write_text_atomic(out, json.dumps({"folds": results, "mean": mean}, indent=2) + "\n")
    lines.append(f"written to {out}")
    log.info("\n".join(lines))
    return 0


def _train_run(args: argparse.Namespace, cfg: config_mod.Config, folder, changed: list[str]):
    """Train one run (or continue `folder`); return the exit code and the run folder."""
    resuming = folder is not None
    # heavy imports (torch, pandas) only once the config is known to be good: bad input answers at once
    from .data.pipeline import build_data
    from .runs import RunFolder
    from .train.ensemble import train_ensemble
    from .train.precision import resolve_device, resolve_precision
    from .train.resume import TrainingInterrupted, install_signal_handlers, restore_signal_handlers

    from .threads import configure_threads
    configure_threads()   # the CPUs this process may use, not the machine's: oversubscribed threads spin
    device = resolve_device(cfg.train.device)
    policy = resolve_precision(cfg.train.mixed_precision, device)
    # the saved config is what ran: record the effective device and precision
    cfg = config_mod.update(cfg, train={"device": device.type, "mixed_precision": policy.name})
    auto_batch_note = _auto_batch(cfg, device, args.gpu_memory) if args.auto_batch else None
    if auto_batch_note:
        cfg, auto_batch_note = auto_batch_note
    run = RunFolder(folder) if resuming else RunFolder.create(cfg.run.log_dir)
    run.attach_logging()
    started = time.time()
    training_started = False
    previous_handlers = install_signal_handlers()
    try:
        run.write_config(f"# resolved config of this run; precision {policy.name}: {policy.reason}\n"
                         + config_mod.to_yaml(cfg))
        if resuming:
            log.info("resuming run folder %s%s", run.path, f" with changed {', '.join(changed)}" if changed else "")
        else:
            log.info("run folder %s%s", run.path, "  (test mode)" if cfg.run.test_mode else "")
        log.info("task %s; effective batch %d = micro-batch %d x %d accumulation steps; precision %s: %s",
                 cfg.task, cfg.train.samples_per_step, cfg.train.batch_size,
                 cfg.train.gradient_accumulation_steps, policy.name, policy.reason)
        if auto_batch_note:
            log.info(auto_batch_note)
        data = build_data(cfg)
        run.write_json("scaler.json", data.scaler)
        training_started = True
        with logging_redirect_tqdm(loggers=[logging.getLogger("enhanced_tft")]):
            summary = train_ensemble(cfg, data, device, policy, run, resume=resuming)
        _print_result(summary, run, time.time() - started)
        _after_training(cfg, data, device, policy, run)
        return 0, run.path
    except TrainingInterrupted as stop:
        print(f"etft train: {stop}. Resume with: etft train --resume {run.path}", file=sys.stderr)
        return (143 if stop.signal_name == "SIGTERM" else 130), run.path
    finally:
        restore_signal_handlers(previous_handlers)
        run.detach_logging()
        if not training_started and not resuming:
            import shutil
            shutil.rmtree(run.path, ignore_errors=True)   # bad input found before training: leave no empty run


def _after_training(cfg: config_mod.Config, data, device, policy, run) -> None:
    """Interpretation CSVs, the test split's predictions and report.html; the trained run is already saved,
    so a failure here is reported and leaves the exit code alone."""
    from .interpret import write_interpretation
    from .predict import write_test_predictions
    try:
        write_interpretation(run.path, cfg, data, device, policy)
        write_test_predictions(run.path, data, device, policy)
    except Exception:
        log.exception("interpretation or test predictions failed (the trained run is saved)")
    try:
        from .report import write_report
        write_report(run.path)
    except ImportError as err:
        log.warning("report.html skipped: %s (pip install 'matplotlib>=3.8', then etft report --run %s)",
                    err, run.path)
    except Exception:
        log.exception("report.html failed (the trained run is saved); etft report --run %s retries", run.path)


def _auto_batch(cfg: config_mod.Config, device, gpu_memory: str | None):
    """--auto_batch: the largest micro-batch the plan fits in the budget, with the effective batch kept."""
    import torch

    from .plan_report import plan_dims
    from .train.memory import available_ram_bytes
    from .train.planner import fit_budget, parse_bytes

    if gpu_memory:
        budget, source = parse_bytes(gpu_memory), "--gpu-memory"
    elif device.type == "cuda":
        budget, source = torch.cuda.get_device_properties(device).total_memory, "the GPU's total memory"
    else:
        budget, source = available_ram_bytes() // 2, "half of the available RAM"
    fit = fit_budget(cfg, plan_dims(cfg), budget, cfg.train.mixed_precision, cfg.train.activation_checkpointing,
                     probe=min(cfg.train.batch_size, 32))
    if fit.micro_batch_size < 1:
        raise ValueError(f"--auto_batch: the plan finds no micro-batch that fits {budget / 2**30:.1f} GiB ({source}); "
                         "set train.activation_checkpointing=all or lower data.sequence_length or model.d_model")
    new = config_mod.update(cfg, train={"batch_size": fit.micro_batch_size,
                                        "gradient_accumulation_steps": fit.gradient_accumulation_steps})
    note = (f"auto_batch: budget {budget / 2**30:.1f} GiB ({source}); largest micro-batch that fits "
            f"{fit.max_micro_batch}; batch_size {cfg.train.batch_size} x {cfg.train.gradient_accumulation_steps} -> "
            f"{fit.micro_batch_size} x {fit.gradient_accumulation_steps} (effective batch {cfg.train.samples_per_step} "
            f"kept, predicted peak {fit.predicted_peak_bytes / 2**30:.2f} GiB)")
    return new, note


def _print_result(summary: dict, run, seconds: float) -> None:
    test, baseline = summary["test"], summary["baseline"]
    data_stats = ("num_samples", "up_rate", "majority_rate")   # properties of the split, not of a model
    keys = [k for k in test if k not in data_stats and k in baseline]
    several = summary["ensemble"]["size"] > 1
    mean_member = summary["ensemble"].get("mean_member", {}) if several else {}
    label = "ensemble" if several else "model"
    header = f"  {'metric':<20}{label:>12}" + (f"{'mean member':>14}" if mean_member else "") + f"{'baseline':>12}"
    lines = [f"test metrics ({test['num_samples']} samples):", header]
    lines += [f"  {k:<20}{test[k]:>12.4f}" + (f"{mean_member[k]:>14.4f}" if mean_member else "")
              + f"{baseline[k]:>12.4f}" for k in keys]
    lines.append(f"baseline: {baseline['rule']}")
    if "majority_rate" in test:
        lines.append(f"test split: {test['up_rate']:.1%} up bars, majority-class rate {test['majority_rate']:.1%}")
    lines.append(f"train speed {summary['samples_per_s']:.0f} samples/s, peak memory "
                 f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB, {seconds:.0f} s in all")
    lines.append(f"run folder: {run.path}")
    log.info("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    from .runs import setup_console_logging
    from .threads import tune_host_allocator

    tune_host_allocator()   # before torch is imported: reuse freed tensor memory, huge pages for large tensors
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console_logging()
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "plan":
            return cmd_plan(args)
        if args.command == "report":
            return cmd_report(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "bench":
            from .bench_cli import cmd_bench
            return cmd_bench(args)
    except (ConfigError, ValueError) as err:
        print(f"etft {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        import torch

        from .train.resume import NonFiniteGiveUp
        from .train.trainer import OutOfMemoryGiveUp
        if isinstance(err, torch.OutOfMemoryError):   # outside a step (moving the model, say): no recovery there
            err = OutOfMemoryGiveUp(f"out of memory outside a training step ({str(err).splitlines()[0]}); "
                                    "`etft plan` shows what fits; lower model.d_model or model.ff_dim")
        if not isinstance(err, (OutOfMemoryGiveUp, NonFiniteGiveUp)):
            raise
        print(f"etft {args.command}: error: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"etft {args.command}: interrupted", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
