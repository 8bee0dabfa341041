"""`etft bench`: training and inference speed, saved activations, parameters and peak memory of configs.

Every row runs what `etft train` runs: the data pipeline's window sets (WindowSet.batch gathers each
micro-batch), the Trainer's micro-batch/accumulation step (train_window) and its optimizer step
(clip, AdamW, schedule). Definitions, shared with shared/bench/anchor_tft_bench.py so that rows compare:

  train_samples_per_s     effective batch / optimizer-step time, warm-up steps excluded; each repeat
                          times a run of steps, the row reports the median repeat
  infer_samples_per_s     no-grad forward + prediction over the validation split's windows, median repeat
  saved_bytes_per_sample  bytes of the tensors autograd saves for backward in one micro-batch's forward
                          and loss (saved_tensors_hooks; each storage counted once by its data_ptr;
                          parameters excluded), divided by the micro-batch
  peak_memory_bytes       one optimizer step's peak of live tensor bytes (parameters, gradients, AdamW
                          moments, batch, activations, temporaries): the CUDA allocator's peak on a GPU,
                          a storage-counting dispatch mode on the CPU (kernels' hidden scratch not seen)

`--num_features N` sets the number of observed inputs: the n features the pipeline makes from OHLCV
bars, then N - n signal-free AR(1) inputs of the synthetic data (data.num_extra_features; see
`with_observed_features`). Speed does not depend on what the columns hold, only on how many there are.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import tasks
from ..config.schema import Config, update
from ..data import features
from ..data.pipeline import DataBundle, build_data
from ..data.windows import WindowSet
from ..errors import UserError
from ..model.build import build_training_model, dims_for
from ..runs import write_text_atomic
from ..runtime.precision import PrecisionPolicy, resolve_precision
from ..serving.inference import forward_chunk
from .compile import apply_compile
from .planner import StorageTracker
from .trainer import Trainer

log = logging.getLogger(__name__)

JSON_KEYS = ("config", "num_features", "precision", "train_samples_per_s", "infer_samples_per_s",
             "saved_bytes_per_sample", "params")
PRECISION_CHOICES = ("fp32", "bf16", "fp16")


@dataclass
class BenchRow:
    config: str
    num_features: int                 # observed inputs (the model also sees the known calendar inputs)
    precision: str                    # what ran (fp16 requested on a CPU runs bf16)
    train_samples_per_s: float
    infer_samples_per_s: float
    saved_bytes_per_sample: float
    params: int
    peak_memory_bytes: int
    micro_batch_size: int
    accumulation_steps: int
    effective_batch_size: int
    sequence_length: int
    d_model: int
    train_repeats: list[float]        # samples/s of each timed repeat (the row reports their median)
    infer_repeats: list[float]
    warmup_steps: int
    steps_per_repeat: int
    device: str
    threads: int
    compiled: bool


@dataclass(frozen=True)
class BenchSettings:
    repeats: int = 5
    warmup_steps: int = 3
    seconds_per_repeat: float = 3.0   # each repeat runs whole optimizer steps for about this long
    infer_seconds: float = 2.0


# ---------------------------------------------------------------- data

def with_observed_features(cfg: Config, num_features: int | None) -> Config:
    """The config whose synthetic data has exactly `num_features` observed inputs: the pipeline's features from
    OHLCV, then data.num_extra_features signal-free AR(1) inputs x_1, x_2, ... (scaled like every feature)."""
    if num_features is None:
        return cfg
    made = len(features.observed_feature_names(cfg.data.return_lags, cfg.data.volatility_windows))
    if num_features < made:
        raise UserError(f"--num_features={num_features}; allowed: at least {made}, the features the pipeline makes "
                         "from OHLCV bars with this config's return_lags and volatility_windows")
    return update(cfg, data={"num_extra_features": num_features - made})


# ---------------------------------------------------------------- saved activations

def saved_bytes(model: torch.nn.Module, forward_loss, batch_size: int) -> dict[str, float]:
    """Bytes autograd saves for backward while `forward_loss()` runs: each storage once, parameters apart.

    The same definition as the anchor benchmark: the pack hook records every saved tensor's storage by
    data_ptr (and keeps the tensor, so no address is reused during the pass); parameter storages are
    counted apart and left out of the per-sample figure.
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, tuple[int, bool]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen:
            seen[ptr] = (storage.nbytes(), ptr in param_ptrs)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = forward_loss()
    del loss
    total = sum(nbytes for nbytes, _ in seen.values())
    params = sum(nbytes for nbytes, is_param in seen.values() if is_param)
    return {"saved_total_bytes": total, "saved_param_bytes": params,
            "saved_bytes_per_sample": (total - params) / batch_size, "num_storages": len(seen)}


# ---------------------------------------------------------------- peak memory

def _optimizer_state(trainer: Trainer) -> list[torch.Tensor]:
    return [t for state in trainer.optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


def step_peak_bytes(trainer: Trainer, split: WindowSet, window: torch.Tensor) -> int:
    """Peak live tensor bytes of one optimizer step (train_window + optimizer_step)."""
    model, device = trainer.model, trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.train_window(split, window)
        trainer.optimizer_step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    existing = list(model.parameters()) + list(model.buffers()) + _optimizer_state(trainer)
    existing += [p.grad for p in model.parameters() if p.grad is not None]
    tracker = StorageTracker(existing, rounding=1, count_existing=True)
    with tracker:
        trainer.train_window(split, window)
        trainer.optimizer_step()
    return tracker.peak


# ---------------------------------------------------------------- speed

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_repeats(run_once, samples_per_call: int, settings: BenchSettings, seconds: float,
                   device: torch.device, warmup: int) -> tuple[list[float], int]:
    """samples/s of `settings.repeats` runs of n calls each, n sized so that a run lasts about `seconds`."""
    for _ in range(warmup):
        run_once()
    _sync(device)
    started = time.perf_counter()
    run_once()
    _sync(device)
    one = max(time.perf_counter() - started, 1e-6)
    calls = max(1, min(1000, round(seconds / one)))
    rates = []
    for _ in range(settings.repeats):
        started = time.perf_counter()
        for _ in range(calls):
            run_once()
        _sync(device)
        rates.append(calls * samples_per_call / (time.perf_counter() - started))
    return rates, calls


def bench_row(name: str, cfg: Config, data: DataBundle, precision: str, device: torch.device,
              settings: BenchSettings, progress=None) -> BenchRow:
    """Measure one (config, feature count, precision) row."""
    say = progress or (lambda message: None)
    policy: PrecisionPolicy = resolve_precision(precision, device)
    cfg = update(cfg, train={"mixed_precision": policy.name, "max_steps_per_epoch": None})
    torch.manual_seed(cfg.seed)
    task = tasks.for_config(cfg)
    model = build_training_model(cfg, task, dims_for(data.transform), device)
    split = data.splits["train"]
    trial = {k: v.to(device) for k, v in split.batch(torch.arange(cfg.train.micro_batch_size)).items()}
    compiled = apply_compile(model, cfg.train.compile, trial, policy.autocast)
    trainer = Trainer(model, data, cfg, device, policy, seed=cfg.seed, task=task)
    effective = trainer.effective_batch_size
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(cfg.seed))
    num_windows = max(1, len(split) // effective)
    position = [0]

    def train_step() -> None:
        start = (position[0] % num_windows) * effective
        position[0] += 1
        trainer.train_window(split, order[start:start + effective])
        trainer.optimizer_step()

    try:
        say(f"{name} F{data.num_observed} {policy.name}: saved activations")
        model.train()
        micro = order[:trainer.micro_batch_size]
        batch = trainer._to_device(split.batch(micro))

        def forward_loss() -> torch.Tensor:
            with policy.autocast():
                output = model(batch["observed"], batch["known"], batch["symbol"]).output
            return task.loss(output, batch["target"]).sum()

        saved = saved_bytes(model, forward_loss, micro.numel())
        params = sum(p.numel() for p in model.parameters())
        say(f"{name} F{data.num_observed} {policy.name}: peak memory of one step")
        train_step()                     # AdamW's moments exist from here on, as in every later step
        peak = step_peak_bytes(trainer, split, order[:effective])
        say(f"{name} F{data.num_observed} {policy.name}: training speed ({settings.repeats} repeats)")
        train_rates, steps = _timed_repeats(train_step, effective, settings, settings.seconds_per_repeat, device,
                                            settings.warmup_steps)
        say(f"{name} F{data.num_observed} {policy.name}: inference speed")
        infer_rates = _infer_rates(model, task, data, policy, trainer.eval_batch_size, device, settings)
    finally:
        trainer.close()
    row = BenchRow(
        config=name, num_features=data.num_observed, precision=policy.name,
        train_samples_per_s=statistics.median(train_rates), infer_samples_per_s=statistics.median(infer_rates),
        saved_bytes_per_sample=saved["saved_bytes_per_sample"], params=params, peak_memory_bytes=int(peak),
        micro_batch_size=cfg.train.micro_batch_size, accumulation_steps=cfg.train.gradient_accumulation_steps,
        effective_batch_size=effective, sequence_length=cfg.data.sequence_length, d_model=cfg.model.d_model,
        train_repeats=[round(r, 2) for r in train_rates], infer_repeats=[round(r, 2) for r in infer_rates],
        warmup_steps=settings.warmup_steps, steps_per_repeat=steps, device=str(device),
        threads=torch.get_num_threads(), compiled=bool(compiled))
    del model, trainer
    gc.collect()
    return row


def _infer_rates(model, task: tasks.Task, data: DataBundle, policy: PrecisionPolicy, batch_size: int,
                 device: torch.device, settings: BenchSettings) -> list[float]:
    """Forward + prediction over validation windows in chunks of `batch_size`: inference.forward_chunk, what
    every inference pass runs."""
    split = data.splits["val"]
    chunks = list(split.all_indices().split(batch_size))
    if len(chunks) > 1 and chunks[-1].numel() < batch_size:
        chunks = chunks[:-1]             # equal chunks: every call does the same work
    position = [0]
    model.eval()

    def infer_once() -> None:
        chunk = chunks[position[0] % len(chunks)]
        position[0] += 1
        forward_chunk([model], task, split, chunk, device, policy)

    rates, _ = _timed_repeats(infer_once, chunks[0].numel(), settings, settings.infer_seconds, device, 2)
    return rates


# ---------------------------------------------------------------- output

def format_table(rows: list[BenchRow]) -> str:
    head = (f"{'config':<18}{'F':>5}{'prec':>6}{'batch':>9}{'train/s':>10}{'infer/s':>10}{'saved MiB/s':>13}"
            f"{'params':>10}{'peak MiB':>10}")
    lines = [head]
    for r in rows:
        batch = f"{r.micro_batch_size}x{r.accumulation_steps}"
        spread = f" ({min(r.train_repeats):.0f}-{max(r.train_repeats):.0f})"
        lines.append(f"{r.config:<18}{r.num_features:>5}{r.precision:>6}{batch:>9}{r.train_samples_per_s:>10.1f}"
                     f"{r.infer_samples_per_s:>10.0f}{r.saved_bytes_per_sample / 2**20:>13.3f}"
                     f"{r.params / 1e6:>9.2f}M{r.peak_memory_bytes / 2**20:>10.0f}{spread}")
    lines.append("train/s: samples per second of optimizer steps (median of repeats, warm-up excluded; range in "
                 "brackets); saved MiB/s: activations saved for backward per sample; peak: one step's live tensors")
    return "\n".join(lines)


def check_json_target(target: str | None, overwrite: bool) -> None:
    """Before the benchmark runs: an existing file at --json PATH is kept unless --overwrite says otherwise."""
    if target in (None, "-"):
        return
    path = Path(target)
    if path.is_dir():
        raise UserError(f"--json {target!r} is a folder; allowed: a file path (or no PATH for stdout)")
    if path.exists() and not overwrite:
        raise UserError(f"--json {target!r} exists; add --overwrite to replace it, or choose another path")


def write_json(rows: list[BenchRow], target: str) -> None:
    """'-' prints the rows to stdout; any other target is a file (a JSON list of row objects), written whole."""
    text = json.dumps([asdict(r) for r in rows], indent=2)
    if target == "-":
        print(text)
    else:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(target, text + "\n")


def validate_request(num_features: list[int] | None, precisions: list[str], settings: BenchSettings) -> None:
    for n in num_features or []:
        if n < 1:
            raise UserError(f"--num_features={n}; allowed: integers >= 1")
    for p in precisions:
        if p not in PRECISION_CHOICES:
            raise UserError(f"--precision={p!r}; allowed: {', '.join(PRECISION_CHOICES)}")
    if settings.repeats < 1 or settings.warmup_steps < 0 or not settings.seconds_per_repeat > 0:
        raise UserError(f"--repeats={settings.repeats}, --warmup={settings.warmup_steps}, --seconds="
                         f"{settings.seconds_per_repeat}; allowed: repeats >= 1, warmup >= 0, seconds > 0")
    if not math.isfinite(settings.seconds_per_repeat):
        raise UserError("--seconds must be finite")


def run_bench(configs: list[tuple[str, Config]], num_features: list[int] | None, precisions: list[str],
              settings: BenchSettings, device: torch.device, progress=None) -> list[BenchRow]:
    """Every config x feature count x precision, data built once per config and feature count."""
    rows = []
    for name, cfg in configs:
        for count in num_features or [None]:
            data = build_data(with_observed_features(cfg, count))
            for precision in precisions:
                rows.append(bench_row(name, cfg, data, precision, device, settings, progress))
                if progress:
                    r = rows[-1]
                    progress(f"{name} F{r.num_features} {r.precision}: {r.train_samples_per_s:.1f} train samples/s, "
                             f"{r.infer_samples_per_s:.0f} infer samples/s, "
                             f"{r.saved_bytes_per_sample / 2**20:.3f} MiB saved/sample")
    return rows
