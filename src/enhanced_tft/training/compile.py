"""`train.compile`: torch.compile applied to a built model, with a trial step and a logged fallback to eager.

nn.Module.compile() compiles in place, so parameter names, state_dict keys and checkpoints stay those of the
eager model. Compilation is lazy: the trial forward/backward on a real micro-batch makes it happen here,
where a failure (no C++ compiler, an unsupported op) is caught, logged and undone, instead of mid-training.
"""
from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)


def apply_compile(model: torch.nn.Module, enabled: bool, batch: dict[str, torch.Tensor], autocast) -> bool:
    """Compile `model` in place if `enabled`; True if the compiled model ran a trial step, else eager."""
    if not enabled:
        return False
    started = time.perf_counter()
    try:
        model.compile()
        was_training = model.training
        model.train()
        with autocast():
            output = model(batch["observed"], batch["known"], batch["symbol"]).output
        model.head.loss(output, batch["target"]).sum().backward()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    except Exception as err:   # noqa: BLE001 - any compiler failure means: train eagerly
        model._compiled_call_impl = None     # what nn.Module.compile() set: back to the eager forward
        model.zero_grad(set_to_none=True)
        log.warning("train.compile: torch.compile failed (%s: %s); training the eager model instead",
                    type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return False
    log.info("train.compile: model compiled in %.0f s", time.perf_counter() - started)
    return True
