"""Data-parallel training across processes started by torchrun: the process group, each rank's share of the
samples, and the few collectives training needs. Nothing else in the package knows about ranks: it asks the
World it is given (a single process gets World(), whose collectives do nothing).

Exactness: every rank takes a disjoint, contiguous share of each optimizer window and of each split, in order.
Each micro-batch's summed loss is divided by the WHOLE window's sample count, so summing the ranks' gradients
gives exactly the gradient one process computes over the window. Gradients are summed by one all-reduce per
window after every rank has finished its micro-batches, never inside a backward: a rank that runs out of
memory (or receives SIGTERM) reports it in the same agreement step, and all ranks halve (or stop) together at
the same window instead of waiting forever on a rank that will not send. (DistributedDataParallel's reducer
all-reduces inside the backward of the last micro-batch, where a rank that failed earlier would leave the
others hanging; one coalesced all-reduce after the agreement costs the same bytes, without the overlap.)
"""
from __future__ import annotations

import datetime
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..data.shared import export_bundle, map_bundle
from ..errors import RankLost, UserError

log = logging.getLogger(__name__)

# torchrun's worker environment (torch.distributed.run); a plain `python` / `etft` process has none of them
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    node: int = 0          # torchrun's GROUP_RANK: the machine (node rank) this process runs on

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, indices: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of `indices` (sizes differ by at most one; some may be empty)."""
        return indices.tensor_split(self.size)[self.rank] if self.distributed else indices

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag OR-ed over the ranks: one small all-reduce, so that every rank takes the same branch."""
        if not self.distributed:
            return list(flags)
        tensor = torch.tensor([float(f) for f in flags], device=self._device())
        self._all_reduce(tensor, "max")
        return [bool(v) for v in tensor.tolist()]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce a tensor in place (sum over ranks) and return it."""
        if self.distributed:
            self._all_reduce(tensor, "sum")
        return tensor

    def sum_gradients(self, parameters) -> None:
        """Sum every parameter's gradient over the ranks, in one coalesced all-reduce per dtype. A parameter
        without a gradient on this rank (an empty share) contributes zeros."""
        if not self.distributed:
            return
        parameters = list(parameters)
        for p in parameters:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in parameters:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            self.sum_(flat)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable; tensors travel on the CPU), in rank order."""
        if not self.distributed:
            return [value]
        return self._all_gather_object(value)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank."""
        if not self.distributed:
            return value
        return self._broadcast_object(value)

    def on_main(self, work: Callable[[], Any]) -> Any:
        """Run `work` on rank 0 alone and give its result to every rank; a UserError it raises is raised on
        every rank (the others wait for the verdict), with its own class where that class takes a message alone
        (CheckpointError, ConfigError, ...)."""
        outcome = None
        if self.is_main:
            try:
                outcome = (None, work())
            except UserError as err:
                outcome = ((type(err), str(err)), None)
        error, result = self.broadcast(outcome)
        if error is not None:
            try:
                refusal = error[0](error[1])
            except TypeError:
                refusal = UserError(error[1])
            raise refusal
        return result

    @contextmanager
    def peer_loss(self):
        """Turn a collective that failed because another rank went away into RankLost: one line, exit 1 (the
        rank that failed says why in its own log). gloo and NCCL word the failure in their own ways."""
        try:
            yield
        except RuntimeError as err:
            if not self.distributed or not _peer_failure(err):
                raise
            raise RankLost(f"rank {self.rank}: another rank stopped while this one waited on it "
                           f"({str(err).splitlines()[0][:200]}); its own log says why. Under torchrun "
                           "--max-restarts K the group restarts and resumes from the newest checkpoint") from None

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist
            dist.barrier()

    # the process group's primitives: every collective above goes through these three (tests/thread_world.py
    # gives two ranks in one process the same semantics with threads)
    def _all_reduce(self, tensor: torch.Tensor, op: str) -> None:
        import torch.distributed as dist
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)

    def _all_gather_object(self, value: Any) -> list[Any]:
        import torch.distributed as dist
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def _broadcast_object(self, value: Any) -> Any:
        import torch.distributed as dist
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def _device(self) -> torch.device:
        import torch.distributed as dist
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


SINGLE = World()


def _peer_failure(err: RuntimeError) -> bool:
    import torch.distributed as dist
    text = str(err)
    return isinstance(err, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote worker", "NCCL"))


def launched_by_torchrun() -> bool:
    return all(key in os.environ for key in _ENV)


def init_world(device_type: str) -> World:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPUs); a plain process gets SINGLE.

    On GPUs each rank takes the GPU of its local rank. The group's timeout bounds any wait on a rank that died.
    """
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return SINGLE
    import torch.distributed as dist
    rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if not dist.is_initialized():
        # on GPUs: NCCL for CUDA tensors (gradients), gloo for the CPU ones (interpretation sums, flags)
        backend = "cpu:gloo,cuda:nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        timeout = datetime.timedelta(seconds=float(os.environ.get("ETFT_DIST_TIMEOUT_S", 1800)))
        # torchrun's agent keeps one store across --max-restarts: without a prefix per attempt, a restarted
        # rank can read the address a dead rank of the last attempt published, and fail to connect to it
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                              is_master=rank == 0 and not agent_store, timeout=timeout, multi_tenant=True)
        dist.init_process_group(backend, store=dist.PrefixStore(f"etft/attempt_{restart_count()}", store),
                                rank=rank, world_size=size, timeout=timeout)
    return World(rank, size, local_rank, int(os.environ.get("GROUP_RANK", "0")))


def close_world(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def restart_count() -> int:
    """How often torchrun restarted this worker group (--max-restarts); 0 on the first attempt."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def run_id() -> str | None:
    """torchrun's id of this job (--rdzv-id, or the one --standalone made), the same across restarts."""
    value = os.environ.get("TORCHELASTIC_RUN_ID")
    return value if value and value != "none" else None


class RankFilter(logging.Filter):
    """For a handler of a rank other than 0: records from `min_level` up (the console: warnings and errors),
    each prefixed with the rank once."""

    def __init__(self, rank: int, min_level: int = logging.WARNING):
        super().__init__()
        self.prefix, self.min_level = f"[rank {rank}] ", min_level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level:
            return False
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def build_shared_data(build, world: World, folder: "os.PathLike[str]"):
    """The DataBundle `build()` makes, built once per machine: the local rank 0 builds it and writes it to
    `folder` (data/shared.py), every rank of the machine maps those files, then the folder is removed (the
    mappings stay). Host memory therefore does not grow with the ranks. A build error reaches every rank."""
    import shutil
    from pathlib import Path


    folder = Path(folder).with_name(f"{Path(folder).name}_node{world.node}")   # machines may share a folder
    error = None
    if world.local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)   # left by an attempt killed between its export and cleanup
        try:
            export_bundle(build(), folder)
        except UserError as err:
            error = str(err)
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            error = (f"the ranks' shared copy of the data could not be written under {folder.parent} "
                     f"({err.strerror}); set data.memory_map_dir to a folder with room for the feature arrays")
    errors = [e for e in world.gather(error) if e]   # also the barrier: every machine's files exist after it
    if errors:
        raise UserError(errors[0])
    bundle = map_bundle(folder)
    world.barrier()   # every rank has mapped the files
    if world.local_rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
    return bundle
