"""`etft train --auto_batch`: the largest micro-batch the memory plan fits in a budget, effective batch kept.

The plan traces the model the built data implies (its fitted transform), so the plan and the training run
size the model from one source.
"""
from __future__ import annotations

import torch

from ..config.schema import Config, update
from ..errors import UserError
from ..model.build import dims_for
from ..runtime.memory import available_ram_bytes
from .planner import fit_budget, parse_bytes


def auto_batch(cfg: Config, transform, device: torch.device, gpu_memory: str | None,
               num_devices: int = 1) -> tuple[Config, str]:
    """The config with train.micro_batch_size and gradient_accumulation_steps set from the plan, and a log line."""
    if gpu_memory:
        budget, source = parse_bytes(gpu_memory), "--gpu-memory"
    elif device.type == "cuda":
        budget, source = torch.cuda.get_device_properties(device).total_memory, "the GPU's total memory"
    else:
        budget, source = available_ram_bytes() // 2, "half of the available RAM"
    fit = fit_budget(cfg, dims_for(transform), budget, cfg.train.mixed_precision,
                     cfg.train.activation_checkpointing, probe=min(cfg.train.micro_batch_size, 32), num_devices=num_devices)
    if fit.micro_batch_size < 1:
        raise UserError(f"--auto_batch: the plan finds no micro-batch that fits {budget / 2**30:.1f} GiB ({source}); "
                        "set train.activation_checkpointing=all or lower data.sequence_length or model.d_model")
    effective = cfg.train.samples_per_step
    new = update(cfg, train={"micro_batch_size": fit.micro_batch_size,
                             "gradient_accumulation_steps": effective // fit.micro_batch_size})
    note = (f"auto_batch: budget {budget / 2**30:.1f} GiB ({source}); largest micro-batch that fits "
            f"{fit.max_micro_batch}; micro-batch {cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation_steps} -> "
            f"{fit.micro_batch_size} x {fit.gradient_accumulation_steps}"
            + (f" on each of {num_devices} devices" if num_devices > 1 else "")
            + f" (effective batch {effective} kept, predicted peak {fit.predicted_peak_bytes / 2**30:.2f} GiB)")
    return new, note
