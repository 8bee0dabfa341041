"""The run folder: logs/training_<timestamp>/ and every file in it. This module alone names those files,
and every write into it goes through one atomic writer (temp file, fsync, rename, fsync of the folder):
a reader sees the old file or the new one, never half of one, and a crash leaves no half file.

Run folders travel between users, so they are read and written as untrusted: the writer's temporary
file is created exclusively under a fresh random name (nothing planted in the folder is opened), and a
symbolic link where a run file should be is refused on read and on write, so that no file outside the
folder is read into a report or overwritten. One process at a time trains in a folder (`lock`).

torch is imported inside the functions that need it: the CLI creates folders and logs before torch loads.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import CheckpointError, StorageError, UserError

LOGGER_NAME = "enhanced_tft"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"

# the files of a run folder (README: "The run folder")
TRAINING_LOG = "training.log"
CONFIG_YAML = "config.yaml"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"
SCALER_JSON = "scaler.json"
DATA_JSON = "data.json"                       # fingerprint of the bars the run was trained on
CHECKPOINTS = "checkpoints"
IMPORTANCE_CSV = "variable_importance.csv"
IMPORTANCE_BY_SYMBOL_CSV = "variable_importance_by_symbol.csv"
ATTENTION_CSV = "attention_by_lag.csv"
PREDICTIONS_TEST_CSV = "predictions_test.csv"
STRONG_BASELINE_JSON = "strong_baseline.json"  # LightGBM's boosters (text format), for etft evaluate
BACKTEST_CSV = "backtest_test.csv"            # equity curves of the sign backtests on the test split
PREDICTIONS_DEFAULT = "predictions.parquet"   # etft predict without --out
ONNX_EXPORT = "onnx"                          # etft export without --out: the members as ONNX (serving/export.py)
MANIFEST_JSON = "manifest.json"               # in an export folder: its files, their SHA-256, what it predicts
REPORT_HTML = "report.html"
LOCK_FILE = ".lock"                           # held by the process that trains in the folder
TRACKING_JSON = "tracking.json"               # run.tracking: the MLflow run ids a resume continues
TENSORBOARD_DIR = "tensorboard"               # run.tracking: TensorBoard event files
MLFLOW_DB, MLFLOW_ARTIFACTS = "mlflow.db", "mlartifacts"   # LOG_DIR/: the default MLflow store


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX: the folder's entry is written with the folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return   # a platform without folder handles: the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def refuse_link(path: str | Path) -> Path:
    """`path`, unless it is a symbolic link: a run folder's files must be its own plain files."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{str(path)!r} is a symbolic link (to {os.readlink(path)!r}); a run folder's files must be "
                        "plain files, so that etft neither reads nor overwrites anything outside the folder. "
                        "Replace the link with a copy of the file, or remove it")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary path beside `path` with the same ending; on success it is fsync'd and renamed
    over `path`, and the folder fsync'd. On an error the temporary file is removed and `path` is untouched.

    The temporary file is created exclusively (O_EXCL) under a random name: a file or link planted in the
    folder is never opened. A link at `path` itself is refused (the rename would replace the link, but a
    reader of the old name expected a file)."""
    path = refuse_link(path)
    try:
        handle, name = tempfile.mkstemp(prefix=".tmp.", suffix=f".{path.name}", dir=path.parent)
    except OSError as err:
        raise StorageError(path, err) from None
    os.close(handle)
    tmp = Path(name)   # same ending as `path`: writers that pick a format from it still can
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except OSError as err:   # a full disk, a quota, a read-only remount, a file-size limit: the old file stays
        raise StorageError(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def save_checkpoint(obj: Any, path: str | Path) -> None:
    """torch.save through the atomic writer: a crash never leaves half a checkpoint."""
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        try:
            torch.save(obj, handle)
        except RuntimeError as err:
            # torch's zip writer reports a short write (a full disk, a file-size limit) as a RuntimeError
            if "unexpected pos" not in str(err) and "PytorchStreamWriter failed" not in str(err):
                raise
            raise OSError(0, "the write stopped short: disk full, quota or file-size limit") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint; weights_only refuses anything but tensors and plain containers: no code runs."""
    import torch
    refuse_link(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # pickle.UnpicklingError for hidden code, RuntimeError/EOFError for damage
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} refused: it is damaged or holds more than tensors and "
                              f"plain data, and nothing in it was run ({reason[:200]})") from None


class RunFolder:
    """One run's folder: the paths of its files, its log handler, and its writes (all atomic but the logs)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handler: logging.Handler | None = None
        self.on_metrics: Callable[[dict], None] | None = None   # told of each appended record (run.tracking)

    @classmethod
    def create(cls, log_dir: str | Path) -> "RunFolder":
        """A new folder logs/training_YYYYmmdd_HHMMSS, suffixed _2, _3, ... if that second is taken."""
        base = Path(log_dir)
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"run.log_dir={str(base)!r} cannot be created: {err.strerror}") from None
        stamp = time.strftime("%Y%m%d_%H%M%S")
        for attempt in range(1, 1000):
            path = base / (f"training_{stamp}" if attempt == 1 else f"training_{stamp}_{attempt}")
            try:
                path.mkdir()   # atomic: two runs in the same second get different folders
            except FileExistsError:
                continue
            except OSError as err:
                raise UserError(f"run.log_dir={str(base)!r} is not writable: {err.strerror}") from None
            (path / CHECKPOINTS).mkdir()
            return cls(path)
        raise RuntimeError(f"could not find a free run folder name under {base}")

    # ---------------------------------------------------------------- paths

    def file(self, name: str) -> Path:
        """The path of one of the folder's files (refused if a symbolic link stands there)."""
        return refuse_link(self.path / name)

    @property
    def log_file(self) -> Path:
        return self.path / TRAINING_LOG

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def best_checkpoint(self, member: int) -> Path:
        """The member's best weights (a state dict)."""
        return self.checkpoints / f"member_{member}_best.pt"

    def result_file(self, member: int) -> Path:
        """A finished member's test predictions, interpretation sums and summary (reused on resume)."""
        return self.checkpoints / f"member_{member}_result.pt"

    def step_checkpoints(self, member: int) -> list[Path]:
        """The member's resumable checkpoints, oldest first."""
        return sorted(self.checkpoints.glob(f"member_{member}_step_*.pt"))

    def latest_step_checkpoint(self, member: int) -> Path | None:
        files = self.step_checkpoints(member)
        return files[-1] if files else None

    def is_run_folder(self) -> bool:
        return (self.path / CONFIG_YAML).is_file() and self.checkpoints.is_dir()

    def missing(self, *names: str) -> list[str]:
        return [name for name in names if not (self.path / name).is_file()]

    # ---------------------------------------------------------------- writes

    def step_checkpoint(self, member: int, global_step: int) -> Path:
        """member_<i>_step_<n>.pt: a resumable checkpoint (training/checkpoint.py writes and rotates them)."""
        return self.checkpoints / f"member_{member}_step_{global_step:09d}.pt"

    def write_text(self, name: str, text: str) -> Path:
        write_text_atomic(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, payload: dict[str, Any]) -> Path:
        write_json_atomic(self.path / name, payload)
        return self.path / name

    def write_csv(self, name: str, frame) -> Path:
        """A pandas DataFrame as CSV, six significant digits, text cells spreadsheet-safe."""
        with atomic_path(self.path / name) as tmp:
            spreadsheet_safe(frame).to_csv(tmp, index=False, float_format="%.6g")
        return self.path / name

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One JSON line per record: appended (a line at a time), not rewritten."""
        path = refuse_link(self.path / METRICS_JSONL)
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as err:   # a full disk mid-line: cut the torn line off, so that later lines stay readable
            with contextlib.suppress(OSError):
                os.truncate(path, size)
            raise StorageError(path, err) from None
        if self.on_metrics is not None:
            self.on_metrics(record)

    # ---------------------------------------------------------------- reads

    def read_json(self, name: str) -> dict:
        return json.loads(self.file(name).read_text())

    def read_text(self, name: str) -> str | None:
        file = self.file(name)
        return file.read_text() if file.is_file() else None

    def metrics_records(self) -> list[dict]:
        """metrics.jsonl's records; a torn last line (a crash mid-append, a full disk) is left out."""
        lines = [line for line in (self.read_text(METRICS_JSONL) or "").splitlines() if line.strip()]
        records = []
        for number, line in enumerate(lines, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number != len(lines):
                    raise UserError(f"{METRICS_JSONL} of {str(self.path)!r} is damaged at line {number} (not a "
                                    "JSON record): only a torn last line is skipped") from None
                logging.getLogger(__name__).warning("%s: left out its torn last line", METRICS_JSONL)
        return records

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for training: a second process (another --resume of the same run, say) is refused
        with the holder's pid instead of interleaving checkpoints and rotating away the other's files."""
        import fcntl
        path = refuse_link(self.path / LOCK_FILE)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                raise UserError(f"run folder {str(self.path)!r} is in use by process {holder} (another etft train "
                                "or --resume of this run); wait for it to finish or stop it first") from None
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)   # releases the lock

    # ---------------------------------------------------------------- logging

    def attach_logging(self, record_filter: logging.Filter | None = None) -> None:
        """Send the package's log records to training.log (what `tail -f` shows), appended line by line."""
        self._handler = logging.FileHandler(self.log_file, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(_FORMAT))
        if record_filter is not None:
            self._handler.addFilter(record_filter)
        logging.getLogger(LOGGER_NAME).addHandler(self._handler)

    def detach_logging(self) -> None:
        if self._handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(self._handler)
            self._handler.close()
            self._handler = None


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def _safe_text(value):
    """A text cell that a spreadsheet would run as a formula (=HYPERLINK(...), +cmd|...) gets a leading quote,
    as OWASP advises; numbers and other text are left as they are."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def spreadsheet_safe(frame):
    """`frame` with its text cells and column names made safe to open in a spreadsheet (a copy only if needed).
    Symbols and feature names come from the user's data, and CSV files are opened in Excel."""
    from pandas.api.types import is_object_dtype, is_string_dtype
    text_columns = [c for c in frame.columns if is_object_dtype(frame[c]) or is_string_dtype(frame[c])]
    renamed = {c: _safe_text(c) for c in frame.columns if isinstance(c, str) and c.startswith(FORMULA_STARTS)}
    risky = [c for c in text_columns if frame[c].map(lambda v: isinstance(v, str) and v.startswith(FORMULA_STARTS)).any()]
    if not risky and not renamed:
        return frame
    frame = frame.copy()
    for column in risky:
        frame[column] = frame[column].map(_safe_text)
    return frame.rename(columns=renamed)


def restart_marker_file(log_dir: str | Path, job: str) -> Path:
    """LOG_DIR/.torchrun_<job>: the run folder a torchrun job made, for its restarted workers."""
    return Path(log_dir) / f".torchrun_{job}"


def shared_data_folder(base: str | Path, run_name: str, fold: int | None) -> Path:
    """Where the ranks of one machine meet the arrays they share (removed once every rank mapped them)."""
    return Path(base) / (f"etft_data_{run_name}" + (f"_fold{fold}" if fold is not None else ""))


def walk_forward_file(log_dir: str | Path, first_run: Path) -> Path:
    """LOG_DIR/walk_forward_<time of the first fold's run>.json."""
    return Path(log_dir) / f"walk_forward_{first_run.name.removeprefix('training_')}.json"


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (a caller that redirects it, a notebook or a
    test capturing output, gets the lines), not to the stream of the moment logging was set up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console_logging(level: int = logging.INFO) -> None:
    """One readable line per event on stderr, once per process."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_etft_console", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._etft_console = True
        logger.addHandler(handler)
