"""Precision policy: which autocast dtype and whether a GradScaler, and why."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

from ..errors import UserError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str                   # fp32 | bf16 | fp16: what runs
    reason: str                 # one line for the log and the run's config
    device_type: str

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.name)

    @property
    def uses_grad_scaler(self) -> bool:
        # fp16's narrow exponent underflows small gradients; bf16 shares fp32's range and needs no scaling.
        return self.name == "fp16"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_grad_scaler)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device='cuda' but no CUDA GPU is visible; allowed here: auto or cpu")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_precision(requested: bool | str, device: torch.device) -> PrecisionPolicy:
    """Map `mixed_precision` (auto | fp32 | fp16 | bf16 | true | false) to what this device can run."""
    kind = device.type
    if requested is False or requested == "fp32":
        return PrecisionPolicy("fp32", "fp32 requested", kind)
    if kind == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if requested in (True, "auto"):
            if bf16_ok:
                return PrecisionPolicy("bf16", f"{requested!s}: this GPU supports bf16 (fp32 range, no loss scaling)", kind)
            return PrecisionPolicy("fp16", f"{requested!s}: no bf16 on this GPU, fp16 with dynamic loss scaling", kind)
        if requested == "bf16" and not bf16_ok:
            log.warning("mixed_precision=bf16 but this GPU lacks bf16; using fp16 with loss scaling")
            return PrecisionPolicy("fp16", "bf16 requested, unsupported on this GPU: fp16 with loss scaling", kind)
        return PrecisionPolicy(str(requested), f"{requested} requested", kind)
    # CPU
    if requested == "auto":
        return PrecisionPolicy("fp32", "auto on CPU: fp32 (bf16 autocast is slower on CPUs without bf16 units)", kind)
    if requested == "fp16":
        log.warning("mixed_precision=fp16 is not supported on the CPU; using bf16 autocast instead")
        return PrecisionPolicy("bf16", "fp16 requested on CPU, unsupported: bf16 autocast", kind)
    return PrecisionPolicy("bf16", f"{requested!s} on CPU: bf16 autocast", kind)
