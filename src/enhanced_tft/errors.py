"""Every error a user can meet, each with the exit code `etft` gives it (cli asks the error, `exit_code_of`).

0 done; 2 bad input (UserError and its kinds: config, files, checkpoints, a file that could not be written);
3 training could not go on (GiveUp: out of memory at micro-batch 1, NaN/inf steps in a row); 130 / 143 stopped
by SIGINT / SIGTERM with a checkpoint; 1 another rank stopped (one line: that rank's log says why) or an internal
error (any other exception: its traceback and what to report).

This module imports nothing of the package, so that every other module may raise these.
"""
from __future__ import annotations

from pathlib import Path

INTERNAL_ERROR = 1


class UserError(ValueError):
    """Bad input the user must change (config, flags, files, checkpoints): `etft` prints the message and exits 2.

    Any other exception is an internal error: it keeps its traceback (exit 1). A ValueError subclass so that
    code catching ValueError around input parsing keeps working.
    """
    exit_code = 2


class ConfigError(UserError):
    """A config value the user must change; the message names key, value and what is allowed."""


class StorageError(UserError):
    """A file could not be written (disk full, quota, read-only, file-size limit): the message names the file and
    the reason; the previous version of the file is intact and no partial file is left."""

    def __init__(self, path: str | Path, err: OSError, what_next: str = ""):
        self.path, self.reason = Path(path), err.strerror or type(err).__name__
        super().__init__(f"could not write {str(self.path)!r} ({self.reason}); its previous version, if any, is "
                         "intact and no partial file was left. Free some space (or set run.log_dir / --out to "
                         f"another disk) and run the command again{what_next}")

    def with_advice(self, what_next: str) -> "StorageError":
        return StorageError(self.path, OSError(0, self.reason), what_next)


class CheckpointError(UserError):
    """A checkpoint that cannot be used: unreadable, truncated, holding more than tensors and plain data, or
    weights of another model."""


class WeightsMismatch(ValueError):
    """Saved weights whose names or shapes do not fit the model the config describes (callers turn it into a
    CheckpointError naming the file)."""
    exit_code = 2


class GiveUp(RuntimeError):
    """Training could not go on and the config must change: exit 3, the message says what to change."""
    exit_code = 3


class OutOfMemoryGiveUp(GiveUp):
    """Out of memory even at one sample per (micro-)batch: the config itself must change (exit 3)."""

    @classmethod
    def at_one_sample(cls, cfg, phase: str) -> "OutOfMemoryGiveUp":
        """What to change when even micro-batch 1 runs out of memory, with the config's current sizes."""
        m = cfg.model
        return cls(f"out of memory in {phase} even at micro-batch 1 (d_model {m.d_model}, ff_dim {m.ff_dim}, "
                   f"{m.num_transformer_blocks} blocks, sequence_length {cfg.data.sequence_length}, precision "
                   f"{cfg.train.mixed_precision}, activation_checkpointing {cfg.train.activation_checkpointing}). "
                   "Change the config: set train.activation_checkpointing=all and train.mixed_precision=bf16, or "
                   "lower data.sequence_length, model.d_model, model.ff_dim, model.num_transformer_blocks or "
                   "model.variable_hidden_size; `etft plan` shows what fits.")

    @classmethod
    def in_inference(cls, what: str) -> "OutOfMemoryGiveUp":
        """What to change when even one window per batch runs out of memory in a forward pass."""
        return cls(f"out of memory in {what} even at one sample per batch; `etft plan` shows what fits; lower "
                   "model.d_model or model.ff_dim, or predict on a larger device")

    @classmethod
    def outside_a_step(cls, err: BaseException) -> "OutOfMemoryGiveUp":
        """Out of memory where nothing can be halved (moving the model, building data, say)."""
        return cls(f"out of memory outside a training step ({str(err).splitlines()[0]}); `etft plan` shows what "
                   "fits; lower model.d_model or model.ff_dim")


class NonFiniteGiveUp(GiveUp):
    """Too many NaN/inf steps in a row: the last good weights were kept."""


class TrainingInterrupted(RuntimeError):
    """SIGINT/SIGTERM arrived: a checkpoint was written after the current step."""

    def __init__(self, signal_name: str, where: str):
        super().__init__(f"stopped by {signal_name} at {where}; a checkpoint was saved")
        self.signal_name = signal_name

    @property
    def exit_code(self) -> int:
        return 143 if self.signal_name == "SIGTERM" else 130


class RankLost(RuntimeError):
    """Another rank stopped (crashed, killed, out of memory outside a step) while this one waited on it: not a
    bug of this rank, so one line and exit 1; the rank that failed says why in its own log."""
    exit_code = INTERNAL_ERROR
    brief = True


class ExportMismatch(RuntimeError):
    """An exported member that does not compute what its torch model computes: a bug, not the user's input."""
    exit_code = INTERNAL_ERROR


class TrialFailed(Exception):
    """A trial that could not train (out of memory, NaN steps, its data): FAIL with its message; the study goes on."""


def exit_code_of(err: BaseException) -> int:
    """The exit code `etft` gives an error that reached it: its own, or 1 (internal) for any other."""
    if isinstance(err, KeyboardInterrupt):
        return 130
    return int(getattr(err, "exit_code", INTERNAL_ERROR))


def is_brief(err: BaseException) -> bool:
    """Whether the message alone says it all (no traceback): every error of this module but an internal one."""
    return exit_code_of(err) != INTERNAL_ERROR or bool(getattr(err, "brief", False))
