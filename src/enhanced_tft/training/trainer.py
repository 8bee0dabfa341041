"""The training loop: exact gradient accumulation over micro-batches, warm-up + cosine LR, early stopping.

Read top to bottom: fetch a window of `effective_batch_size` samples, run it as micro-batches
(forward, loss, backward), clip, step, log. The trainer receives a built model and window sets;
it never opens a file: checkpoints and metrics leave through the `on_checkpoint`, `on_best` and
`on_epoch_end` hooks.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from tqdm.auto import tqdm

from .. import tasks
from ..config.schema import Config
from ..data.pipeline import DataBundle
from ..data.windows import WindowSet
from ..errors import NonFiniteGiveUp, OutOfMemoryGiveUp, TrainingInterrupted
from ..model.build import dims_for
from ..model.tft import EnhancedTFT
from ..runtime import faults
from ..runtime.memory import MemoryMonitor, OomBackoff, is_out_of_memory
from ..runtime.precision import PrecisionPolicy
from ..runtime.signals import STOP
from ..serving.inference import InferredChunk, infer
from .checkpoint import TrainState
from .distributed import SINGLE, World
from .optim import continue_schedule, lr_lambda, make_optimizer
from .planner import warn_if_step_exceeds_memory
from .resume import TrainProgress, rng_state, set_rng_state
from .warm_start import start_from_linear_rule

log = logging.getLogger(__name__)

INPUT_KEYS = ("observed", "known", "symbol", "target")



@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    epochs_run: int
    stopped_early: bool
    samples_per_s: float        # train samples per second of training time, all epochs
    peak_memory_bytes: int
    optimizer_steps: int
    micro_batch_size: int        # the working size at the end (smaller than configured after OOM recovery)
    oom_recoveries: int


@dataclass
class Evaluation:
    loss: float
    prediction: torch.Tensor     # (N,) or (N, O) as Task.predict returns, on the CPU
    target: torch.Tensor         # (N,)
    raw_return: torch.Tensor     # (N,)


class Trainer:
    def __init__(self, model: EnhancedTFT, data: DataBundle, cfg: Config, device: torch.device,
                 policy: PrecisionPolicy, *, seed: int, member: int = 0, task: tasks.Task | None = None,
                 micro_batch_size: int | None = None,
                 on_epoch_end: Callable[[dict], None] | None = None,
                 on_best: Callable[[dict[str, torch.Tensor], int], None] | None = None,
                 on_checkpoint: Callable[[TrainState], None] | None = None, world: World = SINGLE):
        self.model, self.data, self.cfg, self.device, self.policy = model, data, cfg, device, policy
        self.world = world
        self.stop_agreed = False     # every rank saw a SIGINT/SIGTERM request by the last window's agreement
        self.member = member
        self.task = task or tasks.for_config(cfg)
        self.on_epoch_end, self.on_best = on_epoch_end, on_best
        self.on_checkpoint = on_checkpoint
        self.progress = TrainProgress()
        self.best_state: dict[str, torch.Tensor] | None = None
        self.effective_batch_size = cfg.train.samples_per_step
        # may shrink on OOM (and start shrunk for later ensemble members); the effective batch never does
        micro = min(micro_batch_size or cfg.train.micro_batch_size, self.effective_batch_size)
        give_up = lambda phase: OutOfMemoryGiveUp.at_one_sample(cfg, phase)   # noqa: E731
        self.micro = OomBackoff(micro, device, give_up, self._micro_halved)
        self.eval_chunks = OomBackoff(2 * micro, device, give_up, self._eval_halved)
        self.oom_recoveries = 0
        self.monitor = MemoryMonitor(device)
        self.global_step = 0
        self.order_generator = torch.Generator().manual_seed(seed)
        train = cfg.train
        self.optimizer = make_optimizer(model, train.learning_rate, train.weight_decay, device)
        self.scaler = policy.grad_scaler()
        num_train = len(data.splits["train"])
        self.steps_per_epoch = math.ceil(num_train / self.effective_batch_size)
        if train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, train.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * train.epochs
        self.warmup_steps = int(train.warmup_fraction * self.total_steps)
        self.schedule = {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps}   # as checkpointed
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, self.warmup_steps, train.min_lr_ratio))
        self.skipped_steps = 0

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in INPUT_KEYS}

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer window on each rank (its share of the effective batch)."""
        return math.ceil(math.ceil(self.effective_batch_size / self.world.size) / self.micro_batch_size)

    def accumulate(self, split: WindowSet, window: torch.Tensor) -> torch.Tensor:
        """Forward/backward this rank's share of one optimizer window as micro-batches.

        Each micro-batch's summed loss is divided by the whole window's sample count, so the accumulated
        gradient (summed over ranks) equals the mean-loss gradient of one large batch, whatever the
        micro-batch size and the number of ranks.
        """
        count = window.numel()
        total = torch.zeros((), device=self.device)
        share = self.world.share(window)
        for index, micro in enumerate(share.split(self.micro_batch_size) if share.numel() else ()):
            faults.point("train", self.global_step, index, micro)
            batch = self._to_device(split.batch(micro))
            with self.policy.autocast():
                output = self.model(batch["observed"], batch["known"], batch["symbol"]).output
            losses = self.task.loss(output, batch["target"])                            # (b,) float32
            loss_sum = losses.sum()
            self.scaler.scale(loss_sum / count).backward()
            total += loss_sum.detach()
        return total

    @property
    def micro_batch_size(self) -> int:
        return self.micro.size

    @property
    def eval_batch_size(self) -> int:
        return self.eval_chunks.size

    def _micro_halved(self, phase: str, failed: int, size: int) -> None:
        self.oom_recoveries += 1
        self.eval_chunks.size = min(self.eval_chunks.size, 2 * size)
        log.warning("out of memory in train step %d: micro-batch %d -> %d, accumulation steps -> %d, effective "
                    "batch %d kept; redoing the window from its first micro-batch", self.global_step, failed, size,
                    self.accumulation_steps, self.effective_batch_size)

    def _eval_halved(self, phase: str, failed: int, size: int) -> None:
        self.oom_recoveries += 1
        log.warning("out of memory in %s: evaluation chunk %d -> %d; redoing the chunk", phase, failed, size)

    def train_window(self, split: WindowSet, window: torch.Tensor) -> torch.Tensor:
        """accumulate() with OOM recovery: retried at half the micro-batch until it fits, no sample lost or doubled;
        returns the window's summed loss. With several ranks, they agree after their micro-batches: an OOM on any
        rank makes all of them halve and redo the window; then their gradients are summed."""
        while True:
            out_of_memory = False
            try:
                total = self.accumulate(split, window)
            except Exception as err:   # a CUDA OOM, or the CPU allocator's failure under a ulimit
                if not is_out_of_memory(err):
                    raise
                out_of_memory = True   # leave the except block first so that the traceback's tensors are freed
            out_of_memory, self.stop_agreed = self.world.agree(out_of_memory, STOP.is_set())
            if not out_of_memory:
                self.world.sum_gradients(self.model.parameters())   # nothing to do in a single process
                return self.world.sum_(total)
            self.optimizer.zero_grad(set_to_none=True)   # the interrupted window's partial gradients
            self.micro.halve("train")

    def optimizer_step(self, loss: torch.Tensor | None = None) -> None:
        """Clip, step, schedule; `loss` (the window's sum) tells fp16 loss-scale calibration from a NaN/inf loss."""
        try:
            self._optimizer_step(loss)
        except Exception as err:
            if not is_out_of_memory(err):
                raise
            # a half-applied step cannot be redone exactly: stop cleanly instead of training on a torn state
            raise OutOfMemoryGiveUp(
                "out of memory in the optimizer step (AdamW state and temporaries): the parameters, gradients and "
                "optimizer state alone do not fit. Lower model.d_model, model.ff_dim or model.num_transformer_blocks; "
                "`etft plan` shows the parameter, gradient and optimizer bytes.") from None

    def _optimizer_step(self, loss: torch.Tensor | None) -> None:
        self.scaler.unscale_(self.optimizer)   # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        calibrating = False
        if self.scaler.is_enabled():
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            finite = self.scaler.get_scale() >= scale_before   # a lowered scale means inf/NaN: step skipped
            # GradScaler starts high and halves on overflow until the scaled gradients fit fp16: while the scale
            # still amplifies (> 1), an overflow at a finite loss is that calibration, not a diverging run
            calibrating = not finite and scale_before > 1 and loss is not None and bool(torch.isfinite(loss))
        else:
            finite = bool(torch.isfinite(norm))   # one host sync per optimizer step, not per micro-batch
            if finite:
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self._count_nonfinite(finite, calibrating)

    def _count_nonfinite(self, finite: bool, calibrating: bool) -> None:
        """Count a skipped step; only NaN/inf losses and gradients (not fp16 loss-scale calibration) can end the run."""
        p = self.progress
        if finite:
            p.nonfinite_in_a_row = 0
            return
        self.skipped_steps += 1
        if calibrating:
            log.info("member %d step %d: fp16 gradients overflowed at a finite loss, step skipped; loss scale now %g "
                     "(calibration, not counted toward train.max_nonfinite_steps)", self.member, self.global_step,
                     self.scaler.get_scale())
            return
        p.nonfinite_in_a_row += 1
        p.nonfinite_steps += 1
        log.warning("member %d step %d: NaN/inf loss or gradient, step skipped (%d in a row, %d in all)%s",
                    self.member, self.global_step, p.nonfinite_in_a_row, p.nonfinite_steps,
                    f"; fp16 loss scale now {self.scaler.get_scale():g}" if self.scaler.is_enabled() else "")
        if p.nonfinite_in_a_row >= self.cfg.train.max_nonfinite_steps:
            raise NonFiniteGiveUp(
                f"{p.nonfinite_in_a_row} optimizer steps in a row had NaN/inf losses or gradients (member "
                f"{self.member}, step {self.global_step}); the weights are those of the last good step. Lower "
                "train.learning_rate, check the data for extreme values, or use train.mixed_precision=bf16 or fp32.")

    def train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """Train (the rest of) one epoch over a shuffled order; returns mean loss, samples, seconds.

        The order comes from the data-order RNG as it stood at the epoch's start, so a resumed epoch sees
        the same order and continues at `progress.step_in_epoch`.
        """
        split, p = self.data.splits["train"], self.progress
        self.model.train()
        if p.order_state is None:
            p.order_state = self.order_generator.get_state()
        self.order_generator.set_state(p.order_state)
        order = torch.randperm(len(split), generator=self.order_generator)
        loss_sum = torch.full((), p.epoch_loss_sum, device=self.device, dtype=torch.float64)
        window_loss, window_samples = torch.zeros((), device=self.device), 0
        started = window_started = time.perf_counter()
        seconds_before = p.epoch_seconds
        every = self.cfg.train.log_every_steps
        bar = tqdm(range(p.step_in_epoch, self.steps_per_epoch), initial=p.step_in_epoch, total=self.steps_per_epoch,
                   desc=f"member {self.member} epoch {epoch}/{self.cfg.train.epochs}", unit="step", leave=False,
                   dynamic_ncols=True, disable=None if self.world.is_main else True)
        for step in bar:
            window = order[step * self.effective_batch_size:(step + 1) * self.effective_batch_size]
            step_loss = self.train_window(split, window)
            self.optimizer_step(step_loss)
            self.global_step += 1
            loss_sum += step_loss
            window_loss += step_loss
            p.epoch_samples += window.numel()
            p.step_in_epoch = step + 1
            window_samples += window.numel()
            elapsed = time.perf_counter() - started
            p.epoch_seconds = seconds_before + elapsed
            if step % 10 == 0 or step == self.steps_per_epoch - 1:   # host sync only every 10 steps
                bar.set_postfix(loss=f"{float(loss_sum) / p.epoch_samples:.4f}",
                                samples_s=f"{p.epoch_samples / p.epoch_seconds:.0f}")
            if (step + 1) % every == 0 and step + 1 < self.steps_per_epoch:
                now = time.perf_counter()
                self._log_window(epoch, step + 1, float(window_loss) / window_samples, window_samples / (now - window_started))
                window_loss.zero_()
                window_samples, window_started = 0, now
            if step + 1 < self.steps_per_epoch:
                stopping = self.stop_agreed
                if stopping or self.global_step % self.cfg.train.checkpoint_every_steps == 0:
                    p.epoch_loss_sum = float(loss_sum)
                    self.checkpoint()
                if stopping:
                    raise TrainingInterrupted(STOP.signal_name or "SIGTERM",
                                              f"member {self.member} epoch {epoch} step {step + 1}")
        bar.close()
        p.epoch_loss_sum = float(loss_sum)
        return p.epoch_loss_sum / max(p.epoch_samples, 1), p.epoch_samples, p.epoch_seconds

    def _log_window(self, epoch: int, step: int, loss: float, samples_per_s: float) -> None:
        memory = self.monitor.window()
        log.info("member %d epoch %d step %d/%d  loss %.5f  %.0f samples/s  micro-batch %d x %d  %s", self.member,
                 epoch, step, self.steps_per_epoch, loss, samples_per_s, self.micro_batch_size,
                 self.accumulation_steps, MemoryMonitor.describe(memory))
        if self.on_epoch_end:
            self.on_epoch_end({"kind": "window", "member": self.member, "epoch": epoch, "step": step,
                               "loss/train": loss, "speed/samples_per_s": samples_per_s,
                               "batch/micro": self.micro_batch_size, **memory})

    def inference(self, split_name: str, *, with_loss: bool = False,
                  with_weights: bool = False) -> Iterator[InferredChunk]:
        """This rank's share of the split through the model in evaluation chunks (inference.infer); an OOM halves
        the chunk for the rest of the run. Chunk indices are positions within the share."""
        split = self.data.splits[split_name]
        shard = split.subset(self.world.share(split.all_indices())) if self.world.distributed else split
        return infer([self.model], self.task, shard, self.device, self.policy, self.eval_chunks,
                     with_loss=with_loss, with_weights=with_weights, what=split_name)

    def evaluate(self, split_name: str) -> Evaluation:
        """Loss and predictions on a whole split, in order (each rank scores its share; all get the whole)."""
        split = self.data.splits[split_name]
        predictions, loss_sum = [], torch.zeros((), device=self.device)
        for chunk in self.inference(split_name, with_loss=True):
            loss_sum += chunk.loss_sums[0]
            predictions.append(chunk.predictions[0])
        return Evaluation(float(self.world.sum_(loss_sum)) / max(len(split), 1), self.gather_split(predictions),
                          *split.outcomes())

    def gather_split(self, local: list[torch.Tensor]) -> torch.Tensor:
        """The ranks' predictions of their shares, joined in rank order: the split's order, each sample once."""
        parts = self.world.gather(torch.cat(local) if local else None)
        return torch.cat([part for part in parts if part is not None])

    def fit(self) -> FitResult:
        """Train until the last epoch or early stopping; resumes from `progress` if it was restored."""
        train, p = self.cfg.train, self.progress
        if self.device.type == "cpu" and self.world.is_main:   # where a cgroup limit kills instead of failing
            warn_if_step_exceeds_memory(self.cfg, dims_for(self.data.transform), self.micro_batch_size, self.policy.name)
        if self.model.skip is not None and self.global_step == 0 and p.epoch == 1 and p.step_in_epoch == 0:
            before, after = start_from_linear_rule(self.model, self.task, self.data.splits["train"], self.device,
                                                   self.world.on_main)
            log.info("member %d: linear skip fitted to the last bar's inputs (train loss %.5f -> %.5f); the body "
                     "starts from a zero read-out", self.member, before, after)
        while p.epoch <= train.epochs:
            epoch = p.epoch
            self.monitor.start_epoch()
            train_loss, samples, seconds = self.train_epoch(epoch)
            evaluation = self.evaluate("val")
            epoch_peak = self.monitor.peak_since_epoch_start()   # before window() resets the allocator's peak
            p.peak_bytes = max(p.peak_bytes, epoch_peak)
            p.total_samples += samples
            p.total_seconds += seconds
            val_metrics = self.task.metrics(evaluation.prediction, evaluation.target, evaluation.raw_return,
                                            self.data.target_scale())
            improved = evaluation.loss < p.best_loss - 1e-6
            if improved:
                p.best_loss, p.best_epoch, p.stale_epochs = evaluation.loss, epoch, 0
                self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                if self.on_best:
                    self.on_best(self.best_state, epoch)
            else:
                p.stale_epochs += 1
            memory = self.monitor.window()
            record = {
                "kind": "epoch", "member": self.member, "epoch": epoch, "loss/train": train_loss, "loss/val": evaluation.loss,
                **{f"val/{k}": v for k, v in val_metrics.items() if k != "num_samples"},
                "lr": self.scheduler.get_last_lr()[0], "speed/samples_per_s": samples / seconds,
                "memory/peak_bytes": epoch_peak, **memory, "time/epoch_s": seconds,
                "optimizer/skipped_steps": self.skipped_steps, "batch/micro": self.micro_batch_size,
                "batch/accumulation_steps": self.accumulation_steps, "oom/recoveries": self.oom_recoveries,
                "best": improved,
            }
            log.info("member %d epoch %d/%d  train loss %.5f  val loss %.5f%s  %s  %.0f samples/s  %s",
                     self.member, epoch, train.epochs, train_loss, evaluation.loss, " *" if improved else "  ",
                     "  ".join(f"{k} {v:.4f}" for k, v in val_metrics.items() if k not in tasks.SPLIT_STATS),
                     samples / seconds, MemoryMonitor.describe(memory))
            if self.on_epoch_end:
                self.on_epoch_end(record)
            stop_early = p.stale_epochs >= train.early_stopping_patience and epoch < train.epochs
            p.epochs_done = epoch
            p.start_epoch(epoch + 1)
            if stop_early:
                p.stopped_early = True
                p.epoch = train.epochs + 1   # a resumed run must not train on
                log.info("early stopping: val loss has not improved for %d epochs (best %.5f at epoch %d)",
                         train.early_stopping_patience, p.best_loss, p.best_epoch)
            self.checkpoint()
            if self.world.agree(STOP.is_set())[0]:
                raise TrainingInterrupted(STOP.signal_name or "SIGTERM", f"member {self.member} after epoch {epoch}")
            if stop_early:
                break
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return FitResult(p.best_epoch, p.best_loss, p.epochs_done, p.stopped_early, p.total_samples / max(p.total_seconds, 1e-9), p.peak_bytes, self.scheduler.last_epoch,
                         self.micro_batch_size, self.oom_recoveries)

    def train_state(self) -> TrainState:
        """Everything needed to continue exactly: weights, optimizer, scaler, schedule, counters, RNG."""
        return TrainState(
            member=self.member, global_step=self.global_step, model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(),
            scheduler=self.scheduler.state_dict(), progress=self.progress.to_dict(),
            order_generator=self.order_generator.get_state(), rng=rng_state(self.device),
            micro_batch_size=self.micro_batch_size, eval_batch_size=self.eval_batch_size,
            oom_recoveries=self.oom_recoveries, skipped_steps=self.skipped_steps, schedule=self.schedule,
            world_size=self.world.size)   # any other world size may resume it: the same windows and mathematics

    def load_train_state(self, state: TrainState, best_state: dict[str, torch.Tensor] | None = None) -> None:
        self.model.load_state_dict(state.model)
        self.optimizer.load_state_dict(state.optimizer)
        self.scaler.load_state_dict(state.scaler)
        self.scheduler.load_state_dict(state.scheduler)
        self.progress = TrainProgress.from_dict(state.progress)
        self.order_generator.set_state(state.order_generator)
        set_rng_state(state.rng, self.device)
        self.global_step = state.global_step
        self.micro.size, self.eval_chunks.size = state.micro_batch_size, state.eval_batch_size
        self.oom_recoveries, self.skipped_steps = state.oom_recoveries, state.skipped_steps
        self.best_state = best_state
        # train.epochs changed since the checkpoint: continue from the rate reached (kept for later resumes too)
        self.schedule, note = continue_schedule(self.scheduler, state.schedule or self.schedule, self.total_steps,
                                                self.cfg.train.min_lr_ratio)
        if note:
            log.info("member %d: %s", self.member, note)

    def checkpoint(self) -> None:
        if self.on_checkpoint:
            self.on_checkpoint(self.train_state())

    def close(self) -> None:
        """Drop optimizer state and gradients so that the caller can release memory."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None
