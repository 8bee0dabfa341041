"""The training loop: exact gradient accumulation over micro-batches, warm-up + cosine LR, early stopping.

Read top to bottom: fetch a window of `effective_batch_size` samples, run it as micro-batches
(forward, loss, backward), clip, step, log. The trainer receives a built model and window sets;
it never opens a file: checkpoints and metrics leave through the `on_best` and `on_epoch_end` hooks.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import Config
from ..data.pipeline import DataBundle
from ..data.windows import WindowSet
from ..model.tft import EnhancedTFT
from .memory import peak_memory_bytes, reset_peak
from .metrics import task_metrics
from .precision import PrecisionPolicy

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


@dataclass
class Evaluation:
    loss: float
    prediction: torch.Tensor     # (N,) or (N, O) as TaskHead.predict returns, on the CPU
    target: torch.Tensor         # (N,)
    raw_return: torch.Tensor     # (N,)


def lr_lambda(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to `min_ratio` of it."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: decaying biases, norms and per-variable offsets only hurts."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.dim() >= 2 and "embed_bias" not in name else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    def __init__(self, model: EnhancedTFT, data: DataBundle, cfg: Config, device: torch.device,
                 policy: PrecisionPolicy, *, seed: int, member: int = 0,
                 on_epoch_end: Callable[[dict], None] | None = None,
                 on_best: Callable[[dict[str, torch.Tensor], int], None] | None = None):
        self.model, self.data, self.cfg, self.device, self.policy = model, data, cfg, device, policy
        self.member = member
        self.on_epoch_end, self.on_best = on_epoch_end, on_best
        self.micro_batch_size = cfg.train.batch_size
        self.effective_batch_size = cfg.train.effective_batch_size
        self.order_generator = torch.Generator().manual_seed(seed)
        train = cfg.train
        self.optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.learning_rate)
        self.scaler = policy.grad_scaler()
        num_train = len(data.splits["train"])
        self.steps_per_epoch = math.ceil(num_train / self.effective_batch_size)
        if train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, train.max_steps_per_epoch)
        total_steps = self.steps_per_epoch * train.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, int(train.warmup_fraction * total_steps), train.min_lr_ratio))
        self.skipped_steps = 0

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k].to(self.device, non_blocking=True) for k in INPUT_KEYS}

    def accumulate(self, split: WindowSet, window: torch.Tensor) -> torch.Tensor:
        """Forward/backward one optimizer window as micro-batches; gradients = those of the whole window.

        Each micro-batch's summed loss is divided by the window's sample count, so the accumulated
        gradient equals the mean-loss gradient of one large batch, whatever the micro-batch size.
        """
        count = window.numel()
        total = torch.zeros((), device=self.device)
        for micro in window.split(self.micro_batch_size):
            batch = self._to_device(split.batch(micro))
            with self.policy.autocast():
                output = self.model(batch["observed"], batch["known"], batch["symbol"]).output
            losses = self.model.head.loss(output, batch["target"])                      # (b,) float32
            loss_sum = losses.sum()
            self.scaler.scale(loss_sum / count).backward()
            total += loss_sum.detach()
        return total

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)   # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip_norm)
        if self.scaler.is_enabled():
            scale_before = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scaler.get_scale() < scale_before:   # inf/NaN gradients: the step was skipped
                self.skipped_steps += 1
                log.info("fp16 overflow: step skipped, loss scale now %g", self.scaler.get_scale())
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()

    def train_epoch(self, epoch: int) -> tuple[float, int, float]:
        """One pass over (a shuffled order of) the train split; returns mean loss, samples, seconds."""
        split = self.data.splits["train"]
        self.model.train()
        order = torch.randperm(len(split), generator=self.order_generator)
        loss_sum = torch.zeros((), device=self.device)
        samples = 0
        started = time.perf_counter()
        bar = tqdm(range(self.steps_per_epoch), desc=f"member {self.member} epoch {epoch}/{self.cfg.train.epochs}",
                   unit="step", leave=False, dynamic_ncols=True, disable=None)
        for step in bar:
            window = order[step * self.effective_batch_size:(step + 1) * self.effective_batch_size]
            loss_sum += self.accumulate(split, window)
            self.optimizer_step()
            samples += window.numel()
            if step % 10 == 0 or step == self.steps_per_epoch - 1:   # host sync only every 10 steps
                elapsed = time.perf_counter() - started
                bar.set_postfix(loss=f"{float(loss_sum) / samples:.4f}", samples_s=f"{samples / elapsed:.0f}")
        bar.close()
        return float(loss_sum) / max(samples, 1), samples, time.perf_counter() - started

    @torch.no_grad()
    def evaluate(self, split_name: str) -> Evaluation:
        """Loss and predictions on a whole split, in order, in chunks of twice the micro-batch."""
        split = self.data.splits[split_name]
        self.model.eval()
        outputs, loss_sum = [], torch.zeros((), device=self.device)
        for chunk in split.all_indices().split(2 * self.micro_batch_size):
            batch = self._to_device(split.batch(chunk))
            with self.policy.autocast():
                output = self.model(batch["observed"], batch["known"], batch["symbol"]).output
            loss_sum += self.model.head.loss(output, batch["target"]).sum()
            outputs.append(self.model.head.predict(output).cpu())
        arrays = split.arrays
        ends = split.sample_ends
        return Evaluation(float(loss_sum) / max(len(split), 1), torch.cat(outputs),
                          arrays.target.index_select(0, ends), arrays.raw_return.index_select(0, ends))

    def fit(self) -> FitResult:
        train = self.cfg.train
        best_loss, best_epoch, best_state = math.inf, 0, None
        stale, total_samples, total_seconds, peak = 0, 0, 0.0, 0
        epoch = 0
        for epoch in range(1, train.epochs + 1):
            reset_peak(self.device)
            train_loss, samples, seconds = self.train_epoch(epoch)
            evaluation = self.evaluate("val")
            peak = max(peak, peak_memory_bytes(self.device))
            total_samples, total_seconds = total_samples + samples, total_seconds + seconds
            val_metrics = task_metrics(self.cfg.task, evaluation.prediction, evaluation.target,
                                       evaluation.raw_return, self.data.target_std)
            improved = evaluation.loss < best_loss - 1e-6
            if improved:
                best_loss, best_epoch, stale = evaluation.loss, epoch, 0
                best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
                if self.on_best:
                    self.on_best(best_state, epoch)
            else:
                stale += 1
            record = {
                "member": self.member, "epoch": epoch, "loss/train": train_loss, "loss/val": evaluation.loss,
                **{f"val/{k}": v for k, v in val_metrics.items() if k != "num_samples"},
                "lr": self.scheduler.get_last_lr()[0], "speed/samples_per_s": samples / seconds,
                "memory/peak_bytes": peak_memory_bytes(self.device), "time/epoch_s": seconds,
                "optimizer/skipped_steps": self.skipped_steps, "best": improved,
            }
            log.info("member %d epoch %d/%d  train loss %.5f  val loss %.5f%s  %s  %.0f samples/s  peak %.0f MiB",
                     self.member, epoch, train.epochs, train_loss, evaluation.loss, " *" if improved else "  ",
                     "  ".join(f"{k} {v:.4f}" for k, v in val_metrics.items() if k != "num_samples"),
                     samples / seconds, record["memory/peak_bytes"] / 2**20)
            if self.on_epoch_end:
                self.on_epoch_end(record)
            if stale >= train.early_stopping_patience:
                log.info("early stopping: val loss has not improved for %d epochs (best %.5f at epoch %d)",
                         stale, best_loss, best_epoch)
                break
        if best_state is not None:
            self.model.load_state_dict(best_state)
        return FitResult(best_epoch, best_loss, epoch, epoch < train.epochs, total_samples / max(total_seconds, 1e-9),
                         peak, self.scheduler.last_epoch)

    def close(self) -> None:
        """Drop optimizer state and gradients so that the caller can release memory."""
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self.scaler = None
