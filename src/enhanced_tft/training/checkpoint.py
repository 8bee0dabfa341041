"""A member's checkpoints: what one holds to continue exactly (TrainState, whose fields are the checkpoint's
keys), and saving, rotating, loading and verifying them before a resume rewrites anything.

The run folder names the files (runs.RunFolder) and reads them with torch.load(weights_only=True): no code in
a file runs. FORMAT_VERSION is written into every step checkpoint; files without it (version 0) hold the same
keys, less the optional ones.
"""
from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..config.schema import Config
from ..errors import CheckpointError
from ..model.build import build_training_model, weights_problem
from ..runs import RunFolder, load_checkpoint, save_checkpoint
from ..tasks import Task
from .resume import TrainProgress

FORMAT_VERSION = 1


@dataclass
class TrainState:
    """Everything a member's training needs to continue exactly: weights, optimizer, scaler, schedule, counters,
    random states. Its fields are the checkpoint file's keys."""
    member: int
    global_step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]
    scheduler: dict[str, Any]
    progress: dict[str, Any]            # TrainProgress.to_dict()
    order_generator: torch.Tensor       # the data-order generator's state
    rng: dict[str, torch.Tensor]        # torch's CPU (and CUDA) generators
    micro_batch_size: int               # the working sizes, smaller than configured after an out-of-memory
    eval_batch_size: int
    oom_recoveries: int
    skipped_steps: int
    schedule: dict[str, Any] | None = None   # the LR schedule record (train.epochs may change on resume)
    world_size: int = 1                 # ranks that wrote it; any other number may continue it
    config: dict[str, Any] | None = None     # the run's config: a file says which run it belongs to
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def problem(cls, raw: Any) -> str | None:
        """Why a checkpoint file's contents are not a state to continue from (not a mapping, a key the trainer
        reads missing, a newer format), or None."""
        if not isinstance(raw, dict):
            return f"it holds no training state (a {type(raw).__name__})"
        required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
        absent = [k for k in required if k not in raw]
        if absent:
            return f"it lacks {', '.join(absent)}"
        version = raw.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            return (f"its format version {version!r} is newer than this version's {FORMAT_VERSION}; resume it with "
                    "the Enhanced TFT that wrote it")
        return None

    @classmethod
    def from_dict(cls, raw: Any, source: str) -> "TrainState":
        """The state a checkpoint file holds; CheckpointError naming `source` and the problem where there is one."""
        problem = cls.problem(raw)
        if problem:
            raise CheckpointError(f"checkpoint {source!r}: {problem}")
        version = raw.get("format_version", 0)
        known = {f.name for f in fields(cls)}
        state = cls(**{k: v for k, v in raw.items() if k in known})
        state.format_version = FORMAT_VERSION if version else 0
        return state


def save_step(run: RunFolder, member: int, state: TrainState, keep: int) -> Path:
    """member_<i>_step_<n>.pt, written whole; then only the newest `keep` of the member's are kept."""
    path = run.step_checkpoint(member, state.global_step)
    save_checkpoint(state.to_dict(), path)
    for old in run.step_checkpoints(member)[:-keep]:   # only once the new one is safely written
        old.unlink(missing_ok=True)
    return path


def load_step(path: Path) -> TrainState:
    return TrainState.from_dict(load_checkpoint(path), str(path))


def save_best(weights: dict[str, torch.Tensor], path: Path) -> None:
    save_checkpoint(weights, path)


def load_best(path: Path) -> dict[str, torch.Tensor] | None:
    return load_checkpoint(path) if path.is_file() else None


def expected_shapes(cfg: Config, task: Task, dims) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the weights the config's model has, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = build_training_model(cfg, task, dims)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def verify_resumable(cfg: Config, task: Task, dims, run: RunFolder) -> None:
    """Before a resume rewrites anything: every checkpoint it will load is readable, holds what the trainer
    reads, and has the weights of the model config.yaml describes; else CheckpointError naming the file."""
    expected = expected_shapes(cfg, task, dims)
    for member in range(cfg.train.ensemble_size):
        if run.result_file(member).is_file():
            continue   # finished: its result is reused as it is (MemberResult.from_dict checks it)
        for path, resumable in ((run.latest_step_checkpoint(member), True), (run.best_checkpoint(member), False)):
            if path is None or not path.is_file():
                continue
            raw = load_checkpoint(path)
            problem = (TrainState.problem(raw) or _progress_problem(raw)) if resumable else None
            problem = problem or weights_problem(raw["model"] if resumable else raw, expected)
            if problem:
                raise CheckpointError(
                    f"checkpoint {str(path)!r} cannot be resumed with this run's config.yaml ({problem}); nothing "
                    "was changed in the run folder. It belongs to another run or version: restore the run's own "
                    "checkpoints, or start a new run")
            del raw


def _progress_problem(raw: dict) -> str | None:
    progress = raw.get("progress")
    unknown = sorted(set(progress) - set(TrainProgress.__dataclass_fields__)) if isinstance(progress, dict) else []
    return f"its progress record has unknown fields {', '.join(unknown)}" if unknown else None
