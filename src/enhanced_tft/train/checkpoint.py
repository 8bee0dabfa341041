"""Checkpoints written atomically (temp file, fsync, rename) and loaded without running pickled code."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """Write to a temporary file beside `path`, then rename over it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)   # after a failed write: no stray temp file, the old checkpoint untouched


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, truncated, or holding more than tensors and plain data."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint; weights_only refuses anything but tensors and plain containers: no code runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # pickle.UnpicklingError for hidden code, RuntimeError/EOFError for damage
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} refused: it is damaged or holds more than tensors and "
                              f"plain data, and nothing in it was run ({reason[:200]})") from None
