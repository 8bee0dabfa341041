"""The one batched inference loop: training's evaluation, the test pass after training (metrics, predictions
and interpretation from one pass), `etft predict` / `evaluate` and `etft bench` all run it.

A split is cut into chunks of `batch_size` samples in split order; every model sees the same chunk. A chunk
that runs out of memory is freed and redone at half the size (OutOfMemoryGiveUp at one sample): no sample
skipped or counted twice. The same chunking gives the same numbers to the bit wherever it runs.

Legend: B chunk, M models, O head outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..data.windows import WindowSet
from ..errors import OutOfMemoryGiveUp
from ..model.tft import EnhancedTFT, TFTOutput
from ..runtime import faults
from ..runtime.memory import OomBackoff, is_out_of_memory
from ..runtime.precision import PrecisionPolicy
from ..tasks import Task

MODEL_INPUTS = ("observed", "known", "symbol")


@dataclass
class InferredChunk:
    indices: torch.Tensor                  # (B,) sample positions within the split
    symbol: torch.Tensor                   # (B,) symbol ids, on the CPU
    predictions: list[torch.Tensor]        # per model: task.predict of the output, (B,) or (B, O), on the CPU
    loss_sums: list[torch.Tensor] | None   # per model: summed task loss over the chunk (a device scalar)
    outputs: list[TFTOutput] | None        # per model, with selection and attention weights (with_weights)


def forward_chunk(models: list[EnhancedTFT], task: Task, split: WindowSet, chunk: torch.Tensor,
                  device: torch.device, policy: PrecisionPolicy, with_loss: bool = False,
                  with_weights: bool = False) -> InferredChunk:
    """One chunk through every model (no gradients)."""
    batch = split.batch(chunk)
    inputs = [batch[k].to(device, non_blocking=True) for k in MODEL_INPUTS]
    target = batch["target"].to(device, non_blocking=True) if with_loss else None
    predictions, losses, outputs = [], [], []
    with torch.no_grad():
        for model in models:
            with policy.autocast():
                out = model(*inputs, return_weights=with_weights)
            if with_loss:
                losses.append(task.loss(out.output, target).sum())
            predictions.append(task.predict(out.output).cpu())
            outputs.append(out)
    return InferredChunk(chunk, batch["symbol"], predictions, losses if with_loss else None,
                         outputs if with_weights else None)


def infer(models: list[EnhancedTFT], task: Task, split: WindowSet, device: torch.device, policy: PrecisionPolicy,
          batches: int | OomBackoff, *, with_loss: bool = False, with_weights: bool = False,
          what: str = "inference") -> Iterator[InferredChunk]:
    """Yield every chunk of `split` through `models`, in split order, halving the chunk after an OOM.

    `batches`: the chunk size, or the caller's OomBackoff (training keeps its evaluation chunk shrunk for the
    rest of the run).
    """
    backoff = batches if isinstance(batches, OomBackoff) else OomBackoff(batches, device, OutOfMemoryGiveUp.in_inference)
    for model in models:
        model.eval()
    indices = split.all_indices()
    position, chunk_index = 0, 0
    while position < len(split):
        chunk = indices[position:position + backoff.size]
        try:
            faults.point(what, 0, chunk_index, chunk)
            result = forward_chunk(models, task, split, chunk, device, policy, with_loss, with_weights)
        except Exception as err:   # a CUDA OOM, or the CPU allocator's failure under a ulimit
            if not is_out_of_memory(err):
                raise
            # leave the except block first so that the traceback's tensors are freed
        else:
            yield result
            position += chunk.numel()
            chunk_index += 1
            continue
        result = None
        backoff.halve(what)
