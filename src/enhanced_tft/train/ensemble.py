"""Train ensemble members with seeds seed, seed+1, ..., release memory between them, average their test
predictions, and compose summary.json."""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..config import Config
from ..data.pipeline import DataBundle
from ..data.transform import Transform
from ..data.windows import WindowSet
from ..model.tft import ModelDims, build_model
from ..runs import RunFolder
from .checkpoint import CheckpointError, load_checkpoint, save_atomic
from .compile import apply_compile
from .memory import release_memory
from .metrics import baseline_prediction, task_metrics
from .precision import PrecisionPolicy
from .resume import NonFiniteGiveUp
from .trainer import FaultHook, OutOfMemoryGiveUp, Trainer

log = logging.getLogger(__name__)


def transform_dims(t: Transform) -> ModelDims:
    """The model's input sizes that a fitted transform implies (features, calendar inputs, symbols, horizon)."""
    return ModelDims(len(t.features), len(t.known_features), len(t.symbols), t.horizon)


def model_dims(data: DataBundle) -> ModelDims:
    return transform_dims(data.transform)


def load_member(cfg: Config, dims: ModelDims, checkpoint: Path, device: torch.device) -> torch.nn.Module:
    """A member's best weights in a freshly built model, in eval mode (weights-only load: no code runs)."""
    model = build_model(cfg, dims)
    try:
        model.load_state_dict(load_checkpoint(checkpoint))
    except RuntimeError as err:   # missing or misshapen weights: another model's checkpoint
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} does not fit the run's model (config.yaml): "
                              f"{str(err).splitlines()[0][:300]}") from None
    return model.to(device).eval()


def bootstrap_windows(data: DataBundle, seed: int) -> DataBundle:
    """The bundle with its train split resampled with replacement (same size), drawn from `seed`.

    The resample holds sample indices only: the series arrays are shared, nothing is copied. The same
    seed gives the same resample, so a resumed member continues on the windows it started with.
    """
    train = data.splits["train"]
    picks = torch.randint(len(train), (len(train),), generator=torch.Generator().manual_seed(seed))
    resampled = WindowSet(train.arrays, train.sample_ends[picks].numpy(), train.sequence_length, train.horizon)
    return dataclasses.replace(data, splits={**data.splits, "train": resampled})


class CheckpointRotation:
    """Resumable checkpoints of one member: member_<i>_step_<n>.pt, the newest `keep` of them kept."""

    def __init__(self, folder: Path, member: int, keep: int):
        self.folder, self.member, self.keep = folder, member, keep

    def files(self) -> list[Path]:
        return sorted(self.folder.glob(f"member_{self.member}_step_*.pt"))

    def save(self, state: dict) -> None:
        save_atomic(state, self.folder / f"member_{self.member}_step_{state['global_step']:09d}.pt")
        for old in self.files()[:-self.keep]:
            old.unlink(missing_ok=True)

    def latest(self) -> Path | None:
        files = self.files()
        return files[-1] if files else None


def check_free_space(run: RunFolder, num_parameters: int, keep: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints: weights, two AdamW moments, best weights."""
    needed = num_parameters * 4 * 4 * (keep + 1) + 64 * 2**20
    free = shutil.disk_usage(run.path).free
    if free < needed:
        raise ValueError(f"only {free / 2**20:.0f} MiB free under {run.path.parent}, the checkpoints need about "
                         f"{needed / 2**20:.0f} MiB: free some space or set run.log_dir to another disk")


def _member_result_path(run: RunFolder, member: int) -> Path:
    return run.path / "checkpoints" / f"member_{member}_result.pt"


def _stop_with_checkpoint(cfg: Config, run: RunFolder, trainer: Trainer, rotation: CheckpointRotation,
                          status: str, err: Exception) -> None:
    trainer.checkpoint()   # through the same hook as every other checkpoint: rotation, config included
    latest = rotation.latest()
    run.write_json("summary.json", {"task": cfg.task, "status": status, "error": str(err),
                                    "checkpoint": str(latest.relative_to(run.path))})
    raise type(err)(f"{err} Last weights: {latest}") from None


def train_ensemble(cfg: Config, data: DataBundle, device: torch.device, policy: PrecisionPolicy,
                   run: RunFolder, fault_hook: FaultHook | None = None, resume: bool = False) -> dict[str, Any]:
    """Train `ensemble_size` members (continuing a stopped run if `resume`); return and write the summary."""
    started = time.time()
    members, member_predictions = [], []
    micro_batch_size = cfg.train.batch_size   # a size that had to shrink on OOM stays shrunk for later members
    folder = run.path / "checkpoints"
    config_record = cfg.model_dump(mode="json")   # each checkpoint says which config it belongs to
    for member in range(cfg.train.ensemble_size):
        seed = cfg.seed + member
        if resume and _member_result_path(run, member).is_file():
            done = load_checkpoint(_member_result_path(run, member))
            members.append(done["summary"])
            member_predictions.append(done["prediction"])
            micro_batch_size = done["summary"]["micro_batch_size"]
            log.info("member %d finished before the interruption: its results are reused", member)
            continue
        torch.manual_seed(seed)
        model = build_model(cfg, model_dims(data)).to(device)
        if cfg.train.compile:
            trial = data.splits["train"].batch(torch.arange(min(micro_batch_size, len(data.splits["train"]))))
            apply_compile(model, True, {k: v.to(device) for k, v in trial.items()}, policy.autocast)
        if member == 0:
            num_parameters = sum(p.numel() for p in model.parameters())
            check_free_space(run, num_parameters, cfg.train.keep_checkpoints)
            log.info("model: %s parameters on %s; activation checkpointing %s",
                     f"{num_parameters:,}", device, cfg.train.activation_checkpointing)
        checkpoint = run.checkpoint_path(member)
        rotation = CheckpointRotation(folder, member, cfg.train.keep_checkpoints)
        member_data = bootstrap_windows(data, seed) if cfg.train.bootstrap else data
        trainer = Trainer(model, member_data, cfg, device, policy, seed=seed, member=member,
                          micro_batch_size=micro_batch_size, on_epoch_end=run.append_metrics,
                          on_best=lambda state, epoch, path=checkpoint: save_atomic(state, path),
                          on_checkpoint=lambda state: rotation.save({**state, "config": config_record}),
                          fault_hook=fault_hook)
        latest = rotation.latest() if resume else None
        if latest is not None:
            best = load_checkpoint(checkpoint) if checkpoint.is_file() else None
            trainer.load_state_dict(load_checkpoint(latest), best)
            log.info("member %d resumed from %s (epoch %d, step %d of it)", member, latest.name,
                     trainer.progress.epoch, trainer.progress.step_in_epoch)
        try:
            result = trainer.fit()
            test_eval = trainer.evaluate("test")
            micro_batch_size = trainer.micro_batch_size
        except OutOfMemoryGiveUp as err:
            _stop_with_checkpoint(cfg, run, trainer, rotation, "out_of_memory", err)
        except NonFiniteGiveUp as err:
            _stop_with_checkpoint(cfg, run, trainer, rotation, "non_finite", err)
        finally:
            trainer.close()
            del trainer, model
            release_memory(device)
        metrics = task_metrics(cfg.task, test_eval.prediction, test_eval.target, test_eval.raw_return,
                               **data.target_scale())
        member_predictions.append(test_eval.prediction)
        members.append(summary := {
            "member": member, "seed": seed, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "best_val_loss": result.best_val_loss,
            "optimizer_steps": result.optimizer_steps, "samples_per_s": result.samples_per_s,
            "peak_memory_bytes": result.peak_memory_bytes, "micro_batch_size": result.micro_batch_size,
            "oom_recoveries": result.oom_recoveries,
            "checkpoint": str(checkpoint.relative_to(run.path)), "test": metrics,
        })
        save_atomic({"prediction": test_eval.prediction, "summary": summary}, _member_result_path(run, member))
        log.info("member %d test: %s", member, _fmt(metrics))

    test_split = data.splits["test"]
    test_target = test_split.arrays.target.index_select(0, test_split.sample_ends)
    test_return = test_split.arrays.raw_return.index_select(0, test_split.sample_ends)
    averaged = torch.stack(member_predictions).mean(dim=0)
    ensemble_metrics = task_metrics(cfg.task, averaged, test_target, test_return, **data.target_scale())
    train_split = data.splits["train"]
    train_ends = train_split.sample_ends
    baseline = baseline_prediction(cfg.task, train_split.arrays.target.index_select(0, train_ends),
                                   train_split.arrays.raw_return.index_select(0, train_ends),
                                   data.target_std, len(test_target), data.target_mean)
    baseline_metrics = task_metrics(cfg.task, baseline, test_target, test_return, **data.target_scale())
    summary = {
        "task": cfg.task,
        "status": "completed",
        "test": ensemble_metrics,
        "baseline": {"rule": ("train mean of the volatility target" if cfg.data.target == "volatility" and
                              cfg.task == "regression" else _BASELINE_RULE[cfg.task]), **baseline_metrics,
                     "output": baseline[0].tolist()},   # the rule's constant output: `etft evaluate` applies it
        "samples_per_s": sum(m["samples_per_s"] for m in members) / len(members),
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in members),
        "ensemble": {"size": len(members), "averaging": "mean of member predictions",
                     "bootstrap": cfg.train.bootstrap, "members": members, "test": ensemble_metrics,
                     "mean_member": {k: sum(m["test"][k] for m in members) / len(members) for k in ensemble_metrics}},
        "precision": {"name": policy.name, "reason": policy.reason},
        "device": str(device),
        "data": {"source": cfg.data.source, "target": cfg.data.target, "symbols": len(data.symbols),
                 "samples": {name: len(split) for name, split in data.splits.items()},
                 "observed_features": data.observed_names, "known_features": data.known_names},
        "effective_batch_size": cfg.train.samples_per_step,
        "wall_time_s": time.time() - started,
    }
    run.write_json("summary.json", summary)
    return summary


_BASELINE_RULE = {
    "classification_binary": "majority class of the train split",
    "classification_multiclass": "class frequencies of the train split",
    "regression": "zero return",
    "quantile": "unconditional train quantiles",
}


def _fmt(metrics: dict[str, float]) -> str:
    return "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
