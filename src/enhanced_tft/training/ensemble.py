"""Ensemble members: train one (`train_member`), summarize several (`summarize_ensemble`), and the loop over
seeds seed, seed+1, ... that releases memory between them (`train_ensemble`).

After its training, a member's best weights make one pass over the test split that gives its test
predictions (metrics, predictions_test.csv) and its selection and attention weights (interpretation).
"""
from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config.schema import Config
from ..data.pipeline import DataBundle
from ..data.windows import WindowSet
from ..errors import CheckpointError, NonFiniteGiveUp, OutOfMemoryGiveUp, UserError
from ..evaluation import blend
from ..evaluation.baselines import fit_strong_baseline
from ..evaluation.interpret import WeightSums
from ..evaluation.scorecard import baseline_output, equity_curves, quant_of, score
from ..evaluation.volatility import of_split as volatility_baselines
from ..model.build import build_training_model, dims_for
from ..runs import STRONG_BASELINE_JSON, SUMMARY_JSON, RunFolder, load_checkpoint, save_checkpoint
from ..runtime.memory import release_memory
from ..runtime.precision import PrecisionPolicy
from ..tasks import Task, ensemble_mean, member_stack
from .checkpoint import load_best, load_step, save_best, save_step
from .compile import apply_compile
from .distributed import SINGLE, World
from .trainer import Trainer

log = logging.getLogger(__name__)


@dataclass
class MemberResult:
    summary: dict[str, Any]       # summary.json's record of the member
    prediction: torch.Tensor      # (N,) or (N, O): its predictions on the test split, as Task.predict gives them
    weights: WeightSums           # its selection and attention weights summed over the test split
    val_prediction: torch.Tensor | None = None   # its predictions on the val split (None: a result saved before)

    def to_dict(self) -> dict:
        return {"summary": self.summary, "prediction": self.prediction, "weights": self.weights.to_dict(),
                "val_prediction": self.val_prediction}

    @classmethod
    def from_dict(cls, state: dict, source: str = "a member's result") -> "MemberResult":
        if not {"summary", "prediction", "weights"} <= state.keys():   # written before the one test pass
            raise CheckpointError(f"{source} was written by an older version of Enhanced TFT (it lacks "
                                  f"{', '.join(sorted({'summary', 'prediction', 'weights'} - state.keys()))}); "
                                  "delete it and resume: that member's test split is scored again from its saved "
                                  "weights")
        return cls(state["summary"], state["prediction"], WeightSums.from_dict(state["weights"]),
                   state.get("val_prediction"))


@dataclass
class EnsembleResult:
    summary: dict[str, Any]
    members: list[MemberResult]
    curves: Any = None   # pandas DataFrame of equity curves on the test split (backtest_test.csv), or None
    blend: list[torch.Tensor] | None = None   # the blend's test predictions (blend_* columns), or None


def bootstrap_windows(data: DataBundle, seed: int) -> DataBundle:
    """The bundle with its train split resampled with replacement (same size), drawn from `seed`.

    The resample holds sample indices only: the series arrays are shared, nothing is copied. The same
    seed gives the same resample, so a resumed member continues on the windows it started with.
    """
    train = data.splits["train"]
    picks = torch.randint(len(train), (len(train),), generator=torch.Generator().manual_seed(seed))
    resampled = WindowSet(train.arrays, train.sample_ends[picks].numpy(), train.sequence_length, train.horizon)
    return dataclasses.replace(data, splits={**data.splits, "train": resampled})


def check_free_space(run: RunFolder, num_parameters: int, keep: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints: weights, two AdamW moments, best weights."""
    needed = num_parameters * 4 * 4 * (keep + 1) + 64 * 2**20
    free = shutil.disk_usage(run.path).free
    if free < needed:
        raise UserError(f"only {free / 2**20:.0f} MiB free under {run.path.parent}, the checkpoints need about "
                        f"{needed / 2**20:.0f} MiB: free some space or set run.log_dir to another disk")


def _stop_with_checkpoint(cfg: Config, run: RunFolder, trainer: Trainer, member: int, status: str,
                          err: Exception, writes: bool) -> None:
    # no collective here: a rank may give up alone (out of memory while scoring its share); it exits and
    # torchrun stops the other ranks, which would otherwise wait on it
    trainer.checkpoint()   # through the same hook as every other checkpoint: rotation, config included
    if not writes:
        raise err
    latest = run.latest_step_checkpoint(member)
    run.write_json(SUMMARY_JSON, {"task": cfg.task, "status": status, "error": str(err),
                                  "checkpoint": str(latest.relative_to(run.path))})
    raise type(err)(f"{err} Last weights: {latest}") from None


def _test_pass(trainer: Trainer, num_symbols: int) -> tuple[torch.Tensor, WeightSums]:
    """The best weights over the test split once: predictions and weight sums together (each rank its share,
    then the predictions gathered and the sums added over the ranks)."""
    split = trainer.data.splits["test"]
    sums = WeightSums.for_model(trainer.model, num_symbols, split.sequence_length + split.horizon)
    predictions = []
    for chunk in trainer.inference("test", with_weights=True):
        predictions.append(chunk.predictions[0])
        sums.add_chunk(chunk.outputs[0], chunk.symbol)
    for name in ("past_SF", "future_SF", "count_S", "attention_KhL"):
        trainer.world.sum_(getattr(sums, name))
    return trainer.gather_split(predictions), sums


def _val_pass(trainer: Trainer) -> torch.Tensor:
    """The best weights' predictions of the val split (what a blend's weight is fitted to)."""
    return trainer.gather_split([chunk.predictions[0] for chunk in trainer.inference("val")])


def train_member(cfg: Config, task: Task, data: DataBundle, device: torch.device, policy: PrecisionPolicy,
                 run: RunFolder, member: int, micro_batch_size: int,
                 resume: bool = False, world: World = SINGLE, writes: bool | None = None,
                 epoch_hook: Callable[[dict], None] | None = None) -> MemberResult:
    """Train member `member` (seed + member), continuing from its newest checkpoint if `resume`, then score it
    on the test split; its result is saved in the run folder (and reused by a later resume). With several
    ranks they train it together, and rank 0 alone writes files (unless `writes` says otherwise)."""
    seed = cfg.seed + member
    torch.manual_seed(seed)
    model = build_training_model(cfg, task, dims_for(data.transform), device)
    if cfg.train.compile:
        trial = data.splits["train"].batch(torch.arange(min(micro_batch_size, len(data.splits["train"]))))
        apply_compile(model, True, {k: v.to(device) for k, v in trial.items()}, policy.autocast)
    writes = world.is_main if writes is None else writes
    if member == 0 and writes:
        num_parameters = sum(p.numel() for p in model.parameters())
        check_free_space(run, num_parameters, cfg.train.keep_checkpoints)
        log.info("model: %s parameters on %s; activation checkpointing %s",
                 f"{num_parameters:,}", device, cfg.train.activation_checkpointing)
    best_path = run.best_checkpoint(member)
    config_record = cfg.model_dump(mode="json")   # each checkpoint says which config it belongs to
    member_data = bootstrap_windows(data, seed) if cfg.train.bootstrap else data

    def on_epoch_end(record: dict) -> None:   # metrics.jsonl, then the caller's hook (etft tune's pruner)
        if writes:
            run.append_metrics(record)
        if epoch_hook is not None and record["kind"] == "epoch":
            epoch_hook(record)
    trainer = Trainer(model, member_data, cfg, device, policy, seed=seed, member=member, task=task,
                      micro_batch_size=micro_batch_size, on_epoch_end=on_epoch_end,
                      on_best=(lambda weights, epoch: save_best(weights, best_path)) if writes else None,
                      on_checkpoint=(lambda state: save_step(run, member, dataclasses.replace(state, config=config_record),
                                                             cfg.train.keep_checkpoints)) if writes else None,
                      world=world)
    latest = world.broadcast(run.latest_step_checkpoint(member) if resume else None)   # one file for all ranks
    if latest is not None:
        state = load_step(latest)
        trainer.load_train_state(state, load_best(best_path))
        log.info("member %d resumed from %s (epoch %d, step %d of it%s)", member, latest.name,
                 trainer.progress.epoch, trainer.progress.step_in_epoch,
                 f"; written by {state.world_size} rank(s), continued by {world.size}"
                 if state.world_size != world.size else "")
    try:
        fit = trainer.fit()
        prediction, weights = _test_pass(trainer, len(data.symbols))
        val_prediction = _val_pass(trainer)
        micro_batch_size = trainer.micro_batch_size
    except OutOfMemoryGiveUp as err:
        _stop_with_checkpoint(cfg, run, trainer, member, "out_of_memory", err, writes)
    except NonFiniteGiveUp as err:
        _stop_with_checkpoint(cfg, run, trainer, member, "non_finite", err, writes)
    finally:
        trainer.close()
        del trainer, model
        release_memory(device)
    test = data.splits["test"]
    metrics = task.metrics(prediction, *test.outcomes(), data.target_scale())
    summary = {
        "member": member, "seed": seed, "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
        "stopped_early": fit.stopped_early, "best_val_loss": fit.best_val_loss,
        "optimizer_steps": fit.optimizer_steps, "samples_per_s": fit.samples_per_s,
        "peak_memory_bytes": fit.peak_memory_bytes, "micro_batch_size": micro_batch_size,
        "oom_recoveries": fit.oom_recoveries, "checkpoint": str(best_path.relative_to(run.path)), "test": metrics,
    }
    result = MemberResult(summary, prediction, weights, val_prediction)
    if writes:
        save_checkpoint(result.to_dict(), run.result_file(member))
    log.info("member %d test: %s", member, "  ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()))
    return result


def summarize_ensemble(cfg: Config, task: Task, data: DataBundle, device: torch.device, policy: PrecisionPolicy,
                       members: list[MemberResult], wall_time_s: float) -> dict[str, Any]:
    """summary.json: the ensemble's test metrics (mean of member predictions) beside the mean member and the
    naive baseline fitted on the train split, each member's record, and how the run went."""
    test, train = data.splits["test"], data.splits["train"]
    target, raw = test.outcomes()
    baseline = baseline_output(task, *train.outcomes(), data.target_scale())
    scores = score(task, [m.prediction for m in members], target, raw, data.target_scale(), baseline)
    records = [m.summary for m in members]
    volatility = volatility_baselines(data.history, test, train)   # None unless data.target=volatility
    return {
        "task": cfg.task,
        "status": "completed",
        "test": scores["test"],
        "baseline": {"rule": task.baseline_rule(), **scores["baseline"], "output": baseline},
        "samples_per_s": sum(r["samples_per_s"] for r in records) / len(records),
        "peak_memory_bytes": max(r["peak_memory_bytes"] for r in records),
        "ensemble": {"size": len(records), "averaging": "mean of member predictions",
                     "bootstrap": cfg.train.bootstrap, "members": records, "test": scores["test"],
                     "mean_member": scores["mean_member"]},
        "precision": {"name": policy.name, "reason": policy.reason},
        "device": str(device),
        "data": {"source": cfg.data.source, "target": cfg.data.target, "symbols": len(data.symbols),
                 "samples": {name: len(split) for name, split in data.splits.items()},
                 "observed_features": data.observed_names, "known_features": data.known_names,
                 "transform_sha256": data.transform.sha256()},   # predict refuses an edited scaler.json
        "effective_batch_size": cfg.train.samples_per_step,
        "wall_time_s": wall_time_s,
        **({"volatility_baselines": volatility} if volatility else {}),
    }


STRONG_RULE = "LightGBM on the model's features (recent bars' features, calendar, symbol), early-stopped on val"


def strong_baseline_and_quant(cfg: Config, task: Task, data: DataBundle,
                              members: list[MemberResult]) -> tuple[dict, Any, Any, list[torch.Tensor] | None]:
    """The summary's `strong_baseline` (LightGBM fitted on the same features, splits and target), `blend` (model
    and LightGBM mixed, evaluation/blend.py) and `quant` (IC, rank IC and backtests of each on the test split); the
    equity curves of the long/short-by-sign backtests (None where quant metrics do not apply), the fitted
    baseline (or None) and the blend's test predictions (or None). None of it stops a trained run: a LightGBM
    failure is logged and recorded."""

    out: dict[str, Any] = {}
    strong = None
    if cfg.train.strong_baseline:
        try:
            strong = fit_strong_baseline(cfg, task, data, log=log)
        except UserError as err:   # LightGBM not installed: the message says how to install or turn it off
            log.warning("strong baseline skipped: %s", err)
            out["strong_baseline"] = {"skipped": str(err)}
        except Exception as err:   # a LightGBM failure must not lose the trained model's summary
            log.exception("strong baseline failed; the model's results are kept")
            out["strong_baseline"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        if strong is not None:
            out["strong_baseline"] = {"rule": STRONG_RULE, **strong.to_summary()}
    test = data.splits["test"]
    predictions = {"model": [m.prediction for m in members]}
    if strong is not None:
        predictions["LightGBM"] = [strong.prediction_test]
    blended = _blend(cfg, task, data, members, strong)
    if blended is not None:
        out["blend"], predictions["blend"] = blended
    model = quant_of(cfg, data.transform, test, predictions["model"])
    if model is None:
        return out, None, strong, predictions.get("blend")
    out["quant"] = {"model": model}
    for name, key in (("LightGBM", "strong_baseline"), ("blend", "blend")):
        if name in predictions:
            out["quant"][key] = quant_of(cfg, data.transform, test, predictions[name])
    return out, equity_curves(cfg, data.transform, test, predictions), strong, predictions.get("blend")


def _blend(cfg: Config, task: Task, data: DataBundle, members: list[MemberResult],
           strong) -> tuple[dict, list[torch.Tensor]] | None:
    """The summary's `blend` (weight fitted on val, metrics on val and test) and its test predictions, or None
    where train.blend is none, LightGBM is missing, or a member's val predictions were saved by an older version."""
    if cfg.train.blend == "none":
        return None
    if strong is None:
        log.info("blend left out: it needs LightGBM's predictions (train.strong_baseline)")
        return None
    if any(m.val_prediction is None for m in members):
        log.info("blend left out: a member's result was saved without its val predictions (an older version)")
        return None
    val, test = data.splits["val"], data.splits["test"]
    model_val = torch.from_numpy(ensemble_mean(member_stack([m.val_prediction for m in members])))
    model_test = torch.from_numpy(ensemble_mean(member_stack([m.prediction for m in members])))
    try:
        weight = blend.fit_weight(task, model_val, strong.prediction_val, val.outcomes()[0])
    except ValueError as err:   # no val sample: the trained run's summary is kept without a blend
        log.info("blend left out: %s", err)
        return None
    blended_val = blend.mix(model_val, strong.prediction_val, weight.model)
    blended_test = blend.mix(model_test, strong.prediction_test, weight.model)
    scale = data.target_scale()
    record = {"rule": blend.RULE, **weight.to_summary(), "val": task.metrics(blended_val, *val.outcomes(), scale),
              "test": task.metrics(blended_test, *test.outcomes(), scale)}
    log.info("blend: %.2f x model + %.2f x LightGBM (val loss %.5f; model alone %.5f, LightGBM alone %.5f); test: %s",
             weight.model, 1 - weight.model, weight.val_loss, weight.val_loss_model, weight.val_loss_strong,
             "  ".join(f"{k} {v:.4f}" for k, v in record["test"].items() if isinstance(v, float)))
    return record, [blended_test]


def train_ensemble(cfg: Config, task: Task, data: DataBundle, device: torch.device, policy: PrecisionPolicy,
                   run: RunFolder, resume: bool = False,
                   world: World = SINGLE, epoch_hook: Callable[[dict], None] | None = None) -> EnsembleResult:
    """Train `ensemble_size` members (reusing those a stopped run finished), then write summary.json (rank 0).

    Under torchrun with train.distribute=members, rank r trains members r, r+N, ... alone on its device and
    writes their files; rank 0 gathers every member's result into the one summary."""
    started = time.time()
    spread = cfg.train.distribute == "members" and world.distributed
    mine = range(world.rank, cfg.train.ensemble_size, world.size) if spread else range(cfg.train.ensemble_size)
    members: list[MemberResult] = []
    micro_batch_size = cfg.train.micro_batch_size   # a size that had to shrink on OOM stays shrunk for later members
    for member in mine:
        done = resume and run.result_file(member).is_file()
        if done if spread else world.broadcast(done):
            members.append(MemberResult.from_dict(load_checkpoint(run.result_file(member)),
                                                  str(run.result_file(member))))
            log.info("member %d finished before the interruption: its results are reused", member)
        else:
            members.append(train_member(cfg, task, data, device, policy, run, member, micro_batch_size,
                                        resume, SINGLE if spread else world, writes=True if spread else None,
                                        epoch_hook=epoch_hook))
        micro_batch_size = members[-1].summary["micro_batch_size"]
    if spread:   # every rank's members, in member order
        gathered = world.gather([(m, r.to_dict()) for m, r in zip(mine, members)])
        members = [MemberResult.from_dict(state) for _, state in sorted(sum(gathered, []), key=lambda x: x[0])]
    summary = summarize_ensemble(cfg, task, data, device, policy, members, time.time() - started)
    summary["world_size"] = world.size
    if world.is_main:   # the other ranks are done: LightGBM may take every CPU
        extra, curves, strong, blended = strong_baseline_and_quant(cfg, task, data, members)
        summary.update(extra)
        if strong is not None:
            run.write_json(STRONG_BASELINE_JSON, strong.saved())
        run.write_json(SUMMARY_JSON, summary)
        return EnsembleResult(summary, members, curves, blended)
    return EnsembleResult(summary, members)
