"""The run folder of the seed's layout: logs/training_<timestamp>/ with training.log, config.yaml,
metrics.jsonl, summary.json and checkpoints/. Files are written whole (temp + rename) or appended."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

LOGGER_NAME = "enhanced_tft"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file, fsync, rename: readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class RunFolder:
    def __init__(self, path: Path):
        self.path = path
        self._handler: logging.Handler | None = None

    @classmethod
    def create(cls, log_dir: str | Path) -> "RunFolder":
        """A new folder logs/training_YYYYmmdd_HHMMSS, suffixed _2, _3, ... if that second is taken."""
        base = Path(log_dir)
        try:
            base.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"run.log_dir={str(base)!r} cannot be created: {err.strerror}") from None
        stamp = time.strftime("%Y%m%d_%H%M%S")
        for attempt in range(1, 1000):
            path = base / (f"training_{stamp}" if attempt == 1 else f"training_{stamp}_{attempt}")
            try:
                path.mkdir()   # atomic: two runs in the same second get different folders
            except FileExistsError:
                continue
            except OSError as err:
                raise ValueError(f"run.log_dir={str(base)!r} is not writable: {err.strerror}") from None
            (path / "checkpoints").mkdir()
            return cls(path)
        raise RuntimeError(f"could not find a free run folder name under {base}")

    @property
    def log_file(self) -> Path:
        return self.path / "training.log"

    def attach_logging(self) -> None:
        """Send the package's log records to training.log (what `tail -f` shows)."""
        self._handler = logging.FileHandler(self.log_file, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter(_FORMAT))
        logging.getLogger(LOGGER_NAME).addHandler(self._handler)

    def detach_logging(self) -> None:
        if self._handler is not None:
            logging.getLogger(LOGGER_NAME).removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def write_config(self, yaml_text: str) -> None:
        write_text_atomic(self.path / "config.yaml", yaml_text)

    def append_metrics(self, record: dict[str, Any]) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        write_text_atomic(self.path / name, json.dumps(payload, indent=2) + "\n")

    def checkpoint_path(self, member: int) -> Path:
        return self.path / "checkpoints" / f"member_{member}_best.pt"


def setup_console_logging(level: int = logging.INFO) -> None:
    """One readable line per event on stderr, once per process."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level)
    if not any(getattr(h, "_etft_console", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
        handler._etft_console = True
        logger.addHandler(handler)
