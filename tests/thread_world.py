"""Two (or more) ranks in one process, one thread each: a World whose collectives meet at a barrier instead of a
process group. The trainer's exact data-parallel step (shares, agreement, summed gradients) runs unchanged; only
the transport differs from torchrun's (gloo), which tests/test_distributed.py keeps testing for real."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

import torch

from enhanced_tft.training.distributed import World


class Exchange:
    """Where the ranks' threads meet: each puts its value in its slot, all wait, all read every slot."""

    def __init__(self, size: int, timeout: float = 120.0):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)   # a rank that died breaks it: no hang
        self._slots: list[Any] = [None] * size

    def all_gather(self, rank: int, value: Any) -> list[Any]:
        self._slots[rank] = value
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()   # nobody writes the next round's value before everyone has read this one
        return out

    def abort(self) -> None:
        self._barrier.abort()


@dataclass(frozen=True)
class ThreadWorld(World):
    exchange: Exchange | None = None

    def _all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        values = self.exchange.all_gather(self.rank, tensor.detach().clone())
        if op == "sum":
            total = values[0].clone()
            for value in values[1:]:   # rank order, as gloo's ring adds two ranks
                total += value
        else:
            total = torch.stack(values).amax(0)
        tensor.copy_(total)

    def _all_gather_object(self, value: Any) -> list[Any]:
        return self.exchange.all_gather(self.rank, value)

    def _broadcast_object(self, value: Any) -> Any:
        return self.exchange.all_gather(self.rank, value)[0]

    def barrier(self) -> None:
        self.exchange.all_gather(self.rank, None)

    def _device(self) -> torch.device:
        return torch.device("cpu")


def run_ranks(size: int, work: Callable[[World], Any]) -> list[Any]:
    """work(world) on `size` ranks, one thread each (named rank0, rank1, ...); their results in rank order. An
    exception on any rank breaks the others' waits and is raised here."""
    exchange = Exchange(size)
    results: list[Any] = [None] * size
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = work(ThreadWorld(rank=rank, size=size, local_rank=rank, exchange=exchange))
        except BaseException as err:   # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
            exchange.abort()

    threads = [threading.Thread(target=rank_main, args=(r,), name=f"rank{r}") for r in range(size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
