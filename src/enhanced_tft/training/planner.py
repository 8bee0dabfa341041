"""Pre-flight memory plan: the peak of one training step, traced on fake tensors (no real memory, no GPU).

The model, optimizer and a batch are built under FakeTensorMode; one micro-batch's forward and backward
and the optimizer step run there with a dispatch mode that counts every storage an op allocates and
frees (rounded up to the CUDA caching allocator's 512-byte granularity). Parameters, gradients and
AdamW's two moments are counted exactly from the parameter list. Activation memory is linear in the
micro-batch, so two traces (at b and 2b) give bytes = fixed + per_sample * b, from which the largest
micro-batch for a memory budget follows.
The trace is of the step a GPU runs: the model's CPU fast paths (numpy dropout masks, variable selection's
hand-written backward; model/layers.py) are off there by default, and are turned off here too (a fake
tensor has no value to seed numpy's generator with). One buffer fake tensors report as empty, the LSTM
kernel's workspace, is counted from its shapes (lstm_workspace_bytes). Nothing in a trace runs a real kernel,
so the plan is the same on any CPU it is computed on; attention is traced as the flash kernel a GPU runs
(output and log-sum-exp kept, no T x T matrix), and the allocator as CUDA's caching one (512-byte blocks).
For a GPU budget the plan keeps a stated margin: the CUDA context (CONTEXT_BYTES, never in the
allocator's figures) and FRAGMENTATION_MARGIN on top of the allocator's peak for rounding and
fragmentation (reserved exceeds allocated).
"""
from __future__ import annotations

import logging
import math
import time
import weakref
from dataclasses import asdict, dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .. import tasks
from ..config.schema import Config
from ..errors import UserError
from ..model.build import build_model
from ..model.layers import set_fast_cpu_kernels
from ..model.tft import CHECKPOINTING, ModelDims, set_activation_checkpointing
from ..runtime.memory import GIB, available_process_memory_bytes
from .optim import param_groups

log = logging.getLogger(__name__)

CONTEXT_BYTES = 768 * 2**20          # CUDA context + cuBLAS/cuDNN workspaces, outside the allocator
FRAGMENTATION_MARGIN = 0.15          # reserved vs allocated headroom
ALLOCATOR_ROUNDING = 512
PRECISIONS = ("fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}   # fp32: no autocast
LSTM_LAYER = torch.ops.aten.mkldnn_rnn_layer.default   # the LSTM kernel of a CPU trace, one call per layer
# bytes per step, sample and unit that an LSTM layer keeps for its backward: the largest of torch 2.13's oneDNN
# kernel on an x86 CPU (gates, states and cell values; fp32 62.7 at most, bf16 44.6, sequence lengths 24-96,
# widths 32-256), rounded up. cuDNN's reserve space on a GPU holds the same gates and states.
LSTM_WORKSPACE_BYTES = {torch.float32: 63, torch.bfloat16: 45, torch.float16: 45}


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOCATOR_ROUNDING) * ALLOCATOR_ROUNDING


class StorageTracker(TorchDispatchMode):
    """Live and peak bytes of the storages that ops allocate while the mode is active, each storage counted
    once until it is freed, its size rounded up to `rounding` bytes.

    `existing` storages (parameters, gradients, optimizer moments, the batch) exist before the step: by
    default they are left out (the plan counts them separately; views of them and in-place updates must not
    count as new allocations); with count_existing they count from the start, and until they are freed.
    """

    def __init__(self, existing: list[torch.Tensor], rounding: int = ALLOCATOR_ROUNDING,
                 count_existing: bool = False):
        super().__init__()
        self.live = 0
        self.peak = 0
        self._rounding = rounding
        self._seen: set[int] = set()
        self._existing: set[int] = set()
        for tensor in existing:
            if count_existing:
                self._track(tensor.untyped_storage())
            else:
                self._existing.add(tensor.untyped_storage()._cdata)
        self.peak = self.live

    def _track(self, storage, nbytes: int | None = None) -> None:
        key = storage._cdata
        if key in self._seen or key in self._existing:
            return
        nbytes = -(-(storage.nbytes() if nbytes is None else nbytes) // self._rounding) * self._rounding
        self._seen.add(key)
        self.live += nbytes
        weakref.finalize(storage, self._free, key, nbytes)

    def _free(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is LSTM_LAYER and isinstance(out[3], FakeTensor):
            # the LSTM's workspace, kept for its backward: empty on fake tensors, counted at its real size
            self._track(out[3].untyped_storage(), lstm_workspace_bytes(args))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        self.peak = max(self.peak, self.live)
        return out


def lstm_workspace_bytes(args: tuple) -> int:
    """The workspace one LSTM layer keeps for its backward (aten.mkldnn_rnn_layer called with `args`): fake
    tensors report it as empty, so it is counted from the shapes, LSTM_WORKSPACE_BYTES per step, sample and unit.

    A formula, not a probe of the kernel: the size a probe finds belongs to the CPU's oneDNN build and instruction
    set (an AMD EPYC's differs from an Intel Xeon's), and a plan for a GPU budget must not depend on the CPU it is
    computed on.
    """
    length, batch = args[0].shape[:2]                        # input (length, batch, features), states (batch, hidden)
    hidden = args[5].shape[-1]
    per_unit = LSTM_WORKSPACE_BYTES[args[0].dtype]
    return per_unit * length * batch * hidden


@dataclass
class StepMemory:
    micro_batch: int
    precision: str
    checkpointing: str
    num_parameters: int
    parameters: int         # bytes, as are the fields below
    gradients: int
    optimizer_state: int
    activations: int        # saved for backward at the end of the forward
    temporaries: int        # the rest of the peak: backward buffers, autocast weight copies, optimizer temporaries
    peak_bytes: int


def trace_step(cfg: Config, dims: ModelDims, micro_batch: int, precision: str, checkpointing: str) -> StepMemory:
    """The memory of one training step as a GPU runs it, traced on fake tensors.

    The model's CPU fast paths are switched off, as on a GPU: the trace is of torch's own dropout and plain
    autograd through variable selection.
    """
    accumulating = cfg.train.gradient_accumulation_steps > 1
    dtype = AUTOCAST_DTYPES.get(precision)
    steps, horizon = cfg.data.sequence_length, dims.horizon
    with FakeTensorMode(allow_non_fake_inputs=False):
        torch.manual_seed(0)
        task = tasks.for_config(cfg)
        model = build_model(cfg.model, dims, task.output_size)
        model = set_activation_checkpointing(set_fast_cpu_kernels(model, False), checkpointing).train()
        params = [p for p in model.parameters()]
        param_bytes = sum(_rounded(p.numel() * p.element_size()) for p in params)
        # foreach: what AdamW uses on CUDA by default (and 10x fewer ops to trace than the per-tensor loop)
        optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=1e-3, foreach=True)
        for p in params:   # create AdamW's moments before tracing: they live through every step
            p.grad = torch.zeros_like(p)
        optimizer.step()
        if not accumulating:
            optimizer.zero_grad(set_to_none=True)
        observed = torch.randn(micro_batch, steps, dims.num_observed)
        known = torch.randn(micro_batch, steps + horizon, dims.num_known)
        symbol = torch.zeros(micro_batch, dtype=torch.int64)
        target = torch.zeros(micro_batch)
        existing = params + [p.grad for p in params if p.grad is not None] + [observed, known, symbol, target]
        existing += [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
        tracker = StorageTracker(existing)
        # the flash kernel, as a GPU runs attention: never the T x T matrix, whatever the CPU would pick
        with tracker, sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                output = model(observed, known, symbol).output
            loss = task.loss(output, target).sum() / micro_batch
            after_forward = tracker.live
            loss.backward()
            del loss, output
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        grad_bytes = param_bytes
        opt_bytes = 2 * param_bytes
        base = param_bytes + opt_bytes + (grad_bytes if accumulating else 0)
        peak = base + tracker.peak
        activations = after_forward
        temporaries = max(0, peak - param_bytes - opt_bytes - grad_bytes - activations)
    return StepMemory(micro_batch, precision, checkpointing, sum(p.numel() for p in params), param_bytes, grad_bytes,
                      opt_bytes, activations, temporaries, peak)


@dataclass
class BudgetFit:
    budget_bytes: int
    usable_bytes: int
    max_micro_batch: int
    micro_batch_size: int              # largest divisor of the effective batch that fits (per device)
    gradient_accumulation_steps: int   # micro-batches per optimizer step on each device
    num_devices: int                   # data-parallel ranks sharing each optimizer window
    predicted_peak_bytes: int


def fit_budget(cfg: Config, dims: ModelDims, budget_bytes: int, precision: str, checkpointing: str,
               probe: int = 64, traced_probe: StepMemory | None = None, num_devices: int = 1) -> BudgetFit:
    """Largest micro-batch under one device's memory budget, keeping the context and fragmentation margins.

    With `num_devices` data-parallel ranks each device runs its share of the effective batch (ceil(E / N)
    samples); the micro-batch divides the effective batch, so that batch_size x accumulation still gives it."""
    small = traced_probe or trace_step(cfg, dims, probe, precision, checkpointing)
    large = trace_step(cfg, dims, 2 * probe, precision, checkpointing)
    per_sample = (large.peak_bytes - small.peak_bytes) / probe
    fixed = small.peak_bytes - per_sample * probe
    usable = int((budget_bytes - CONTEXT_BYTES) / (1 + FRAGMENTATION_MARGIN))
    max_micro = max(0, int((usable - fixed) // per_sample)) if per_sample > 0 else 0
    effective = cfg.train.samples_per_step
    share = -(-effective // num_devices)
    # the largest divisor of the effective batch that fits: divisors come in pairs (d, effective // d) around its
    # square root, so 4,096 trials find it for an effective batch of 2**24 instead of up to 2**24
    pairs = (d for small in range(1, math.isqrt(effective) + 1) if effective % small == 0
             for d in (small, effective // small))
    micro = max((d for d in pairs if d <= min(max_micro, share)), default=0)
    return BudgetFit(budget_bytes, usable, max_micro, micro, -(-share // micro) if micro else 0, num_devices,
                     int(fixed + per_sample * micro) if micro else 0)


def plan(cfg: Config, dims: ModelDims, budget_bytes: int | None = None, num_devices: int = 1) -> dict:
    """The configured step, every precision x checkpointing option, and the fit for a budget (per device, with
    `num_devices` data-parallel ranks sharing the effective batch)."""
    configured_precision = _precision_name(cfg.train.mixed_precision)
    micro = cfg.train.micro_batch_size
    traced = {(p, c): trace_step(cfg, dims, micro, p, c) for p in ("fp32", "bf16") for c in CHECKPOINTING}
    for c in CHECKPOINTING:   # fp16 stores what bf16 stores (2 bytes an element); its GradScaler's scalars are negligible
        traced[("fp16", c)] = StepMemory(**{**asdict(traced[("bf16", c)]), "precision": "fp16"})
    table = [asdict(traced[(p, c)]) for p in PRECISIONS for c in CHECKPOINTING]
    chosen = traced[(configured_precision, cfg.train.activation_checkpointing)]
    result = {
        "micro_batch": micro, "precision": configured_precision,
        "checkpointing": cfg.train.activation_checkpointing, "peak_bytes": chosen.peak_bytes,
        "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "configured_gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "effective_batch_size": cfg.train.samples_per_step,
        "num_parameters": chosen.num_parameters, "input_features": dims.num_observed + dims.num_known,
        "options": table,
        "margin": {"cuda_context_bytes": CONTEXT_BYTES, "fragmentation": FRAGMENTATION_MARGIN,
                   "allocator_rounding_bytes": ALLOCATOR_ROUNDING},
    }
    if budget_bytes is not None:
        fit = fit_budget(cfg, dims, budget_bytes, configured_precision, cfg.train.activation_checkpointing,
                         probe=micro, traced_probe=chosen, num_devices=num_devices)
        result.update(budget_bytes=budget_bytes, max_micro_batch=fit.max_micro_batch,
                      micro_batch_size=fit.micro_batch_size,
                      gradient_accumulation_steps=fit.gradient_accumulation_steps, num_devices=num_devices,
                      fits=fit.micro_batch_size > 0, budget=asdict(fit))
    return result


def _precision_name(requested: bool | str) -> str:
    """What a GPU would run: auto/true -> bf16 (the plan assumes a bf16-capable card), false -> fp32."""
    if requested in (True, "auto"):
        return "bf16"
    if requested is False:
        return "fp32"
    return str(requested)


def parse_bytes(text: str) -> int:
    """'24GiB', '8 GB', '512MiB', '1.5TiB' or a plain number of bytes."""
    units = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if unit not in units or not math.isfinite(value) or value <= 0:
        raise UserError(f"--gpu-memory={text!r} is not a memory size; allowed: a positive number with a unit "
                         "such as 24GiB, 8GB or 512MiB")
    return int(value * units[unit])


def rough_step_bytes(cfg, dims, micro_batch_size: int) -> int:
    """A quick estimate of one fp32 step's peak from the sizes alone (weights, gradients and AdamW at 16 bytes a
    parameter; activations per sample and step), within 0.3x-1.7x of the traced plan from micro-batch 1 to 1024
    at the shipped configs: four times it below the available memory means the step fits without tracing it."""
    m = cfg.model
    steps = cfg.data.sequence_length + dims.horizon
    inputs = dims.num_observed + dims.num_known
    parameters = (m.num_transformer_blocks * (4 * m.d_model ** 2 + 2 * m.d_model * m.ff_dim)
                  + inputs * (m.variable_hidden_size * m.d_model + 4 * m.variable_hidden_size ** 2)
                  + 8 * m.lstm_layers * m.d_model ** 2)
    per_step = (m.d_model * (24 + 16 * m.num_transformer_blocks) + m.ff_dim * 6 * m.num_transformer_blocks
                + inputs * m.variable_hidden_size * 16 + m.num_heads * steps)
    return 16 * parameters + 4 * micro_batch_size * steps * per_step + 256 * 2**20


_PLANNED_PEAKS: dict[tuple, int] = {}   # an ensemble's members share a config: trace it once


def warn_if_step_exceeds_memory(cfg, dims, micro_batch_size: int, precision: str) -> bool:
    """Before training on the CPU: log a warning when the memory plan's peak for one step at `micro_batch_size`
    exceeds what the process may still allocate; returns whether it warned. The plan is advice: if it cannot be
    made, training goes on without it."""
    checkpointing = cfg.train.activation_checkpointing
    key = (cfg.model_dump_json(), repr(dims), micro_batch_size, precision, checkpointing)
    try:
        available = available_process_memory_bytes()
        if 4 * rough_step_bytes(cfg, dims, micro_batch_size) < available.bytes:
            return False   # far from the limit: the trace (about a second) would not change the verdict
        if key not in _PLANNED_PEAKS:
            started = time.perf_counter()
            with torch.random.fork_rng(devices=[]):   # the trace seeds torch's generator; training's must not move
                _PLANNED_PEAKS[key] = trace_step(cfg, dims, micro_batch_size, precision, checkpointing).peak_bytes
            log.debug("memory plan of one step at micro-batch %d: %.2f s", micro_batch_size,
                      time.perf_counter() - started)
        peak = _PLANNED_PEAKS[key]
    except Exception:
        log.debug("no memory plan before training on the CPU", exc_info=True)
        return False
    if peak <= available.bytes:
        return False
    log.warning("memory plan: one training step at micro-batch %d (%s, activation checkpointing %s) peaks at "
                "%.2f GiB, more than the %.2f GiB this process may still allocate (%s). If the allocator fails, "
                "training halves the micro-batch (effective batch kept); `etft train --auto_batch` or `etft plan` "
                "sizes it to fit", micro_batch_size, precision, checkpointing, peak / GIB, available.bytes / GIB,
                available.source)
    return True
