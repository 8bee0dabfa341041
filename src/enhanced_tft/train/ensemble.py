"""Train ensemble members with seeds seed, seed+1, ..., release memory between them, average their test
predictions, and compose summary.json."""
from __future__ import annotations

import logging
import time
from typing import Any

import torch

from ..config import Config
from ..data.pipeline import DataBundle
from ..model.tft import ModelDims, build_model
from ..runs import RunFolder
from .checkpoint import save_atomic
from .memory import release_memory
from .metrics import baseline_prediction, task_metrics
from .precision import PrecisionPolicy
from .trainer import FaultHook, OutOfMemoryGiveUp, Trainer

log = logging.getLogger(__name__)


def model_dims(data: DataBundle) -> ModelDims:
    return ModelDims(data.num_observed, data.num_known, len(data.symbols), data.splits["train"].horizon)


def train_ensemble(cfg: Config, data: DataBundle, device: torch.device, policy: PrecisionPolicy,
                   run: RunFolder, fault_hook: FaultHook | None = None) -> dict[str, Any]:
    """Train `ensemble_size` members; return the summary (also written to the run folder)."""
    started = time.time()
    members, member_predictions = [], []
    test_eval = None
    micro_batch_size = cfg.train.batch_size   # a size that had to shrink on OOM stays shrunk for later members
    for member in range(cfg.train.ensemble_size):
        seed = cfg.seed + member
        torch.manual_seed(seed)
        model = build_model(cfg, model_dims(data)).to(device)
        if member == 0:
            log.info("model: %s parameters on %s; activation checkpointing %s",
                     f"{sum(p.numel() for p in model.parameters()):,}", device, cfg.train.activation_checkpointing)
        checkpoint = run.checkpoint_path(member)
        trainer = Trainer(model, data, cfg, device, policy, seed=seed, member=member,
                          micro_batch_size=micro_batch_size, on_epoch_end=run.append_metrics,
                          on_best=lambda state, epoch, path=checkpoint: save_atomic(state, path),
                          fault_hook=fault_hook)
        try:
            result = trainer.fit()
            test_eval = trainer.evaluate("test")
            micro_batch_size = trainer.micro_batch_size
        except OutOfMemoryGiveUp as err:
            last = run.path / "checkpoints" / f"member_{member}_last.pt"
            save_atomic({k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}, last)
            run.write_json("summary.json", {"task": cfg.task, "status": "out_of_memory", "error": str(err),
                                            "checkpoint": str(last.relative_to(run.path))})
            raise OutOfMemoryGiveUp(f"{err} Last weights: {last}") from None
        finally:
            trainer.close()
            del trainer, model
            release_memory(device)
        metrics = task_metrics(cfg.task, test_eval.prediction, test_eval.target, test_eval.raw_return,
                               data.target_std)
        member_predictions.append(test_eval.prediction)
        members.append({
            "member": member, "seed": seed, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early, "best_val_loss": result.best_val_loss,
            "optimizer_steps": result.optimizer_steps, "samples_per_s": result.samples_per_s,
            "peak_memory_bytes": result.peak_memory_bytes, "micro_batch_size": result.micro_batch_size,
            "oom_recoveries": result.oom_recoveries,
            "checkpoint": str(checkpoint.relative_to(run.path)), "test": metrics,
        })
        log.info("member %d test: %s", member, _fmt(metrics))

    averaged = torch.stack(member_predictions).mean(dim=0)
    ensemble_metrics = task_metrics(cfg.task, averaged, test_eval.target, test_eval.raw_return, data.target_std)
    train_split = data.splits["train"]
    train_ends = train_split.sample_ends
    baseline = baseline_prediction(cfg.task, train_split.arrays.target.index_select(0, train_ends),
                                   train_split.arrays.raw_return.index_select(0, train_ends),
                                   data.target_std, len(test_eval.target))
    baseline_metrics = task_metrics(cfg.task, baseline, test_eval.target, test_eval.raw_return, data.target_std)
    summary = {
        "task": cfg.task,
        "status": "completed",
        "test": ensemble_metrics,
        "baseline": {"rule": _BASELINE_RULE[cfg.task], **baseline_metrics},
        "samples_per_s": sum(m["samples_per_s"] for m in members) / len(members),
        "peak_memory_bytes": max(m["peak_memory_bytes"] for m in members),
        "ensemble": {"size": len(members), "averaging": "mean of member predictions", "members": members,
                     "test": ensemble_metrics},
        "precision": {"name": policy.name, "reason": policy.reason},
        "device": str(device),
        "data": {"source": cfg.data.source, "symbols": len(data.symbols),
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
