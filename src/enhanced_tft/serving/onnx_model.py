"""Serving a run without torch: its ONNX export (etft export) run by ONNX Runtime, from bars to the columns that
`etft predict` writes.

    from enhanced_tft.serve import OnnxModel
    model = OnnxModel.open("logs/training_20261129_101500/onnx")
    table = model.predict("new_bars.csv", timestamp_format="%Y-%m-%d %H:%M")   # or a DataFrame of bars

This module and what it imports need numpy, pandas, pydantic, PyYAML and onnxruntime only: the file reader and
its checks, the features, the fitted transform, the window gathering (data/rows.py) and the prediction table
(data/tables.py) are the very code the torch engine runs. Every file of the export is checked against the
SHA-256 in its manifest.json before it is used (the members and the transform: the very bytes checked).

Legend: B batch, T sequence_length, L = T + H, F features, M members.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .. import tasks
from ..config import schema as config_mod
from ..config.schema import Config
from ..data.pipeline import prediction_rows
from ..data.rows import RowArrays, gather_windows
from ..data.tables import READ_KEYS, new_data_config, table_batches
from ..data.transform import Transform
from ..errors import UserError
from ..runs import CONFIG_YAML, MANIFEST_JSON, ONNX_EXPORT, SCALER_JSON, refuse_link
from ..runtime.threads import available_cpus

MANIFEST_FORMAT = 1
INPUT_NAMES = ("observed", "known", "symbol")   # the exported graph's inputs, in the model's order
OUTPUT_NAME = "prediction"                      # its output: the task's `predict` of the head, (B,) or (B, O)
DEFAULT_BATCH_SIZE = 1024


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def export_command(folder: Path) -> str:
    """The command that (re)writes an export folder, for messages."""
    if folder.name == ONNX_EXPORT:
        return f"etft export --run {folder.parent}"
    return f"etft export --run RUN --out {folder}"


@dataclass
class OnnxModel:
    """An export folder opened: its manifest, the run's config and fitted transform, one session per member."""
    folder: Path
    manifest: dict
    cfg: Config
    transform: Transform
    sessions: list   # onnxruntime.InferenceSession per member, in member order

    @classmethod
    def open(cls, folder: str | os.PathLike, threads: int | None = None) -> "OnnxModel":
        """Check every file against manifest.json and start a CPU session per member (`threads` intra-op threads
        each; default: the CPUs this process may use)."""
        import onnxruntime as ort


        folder = Path(folder)
        manifest_path = refuse_link(folder / MANIFEST_JSON)
        if not manifest_path.is_file():
            raise UserError(f"{str(folder)!r} holds no ONNX export (no {MANIFEST_JSON}): run "
                            f"`{export_command(folder)}` first")
        manifest = _read_manifest(manifest_path)
        files = {name: _checked_file(folder, name, digest) for name, digest in manifest["sha256"].items()}
        source = str(folder / SCALER_JSON)
        transform = Transform.from_dict(json.loads(files[SCALER_JSON]), source)
        cfg = config_mod.load_run_config(folder / CONFIG_YAML)
        transform.check_against(cfg, source)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cpus()
        sessions = [ort.InferenceSession(files[name], options, providers=["CPUExecutionProvider"])
                    for name in manifest["members"]]
        return cls(folder, manifest, cfg, transform, sessions)

    @property
    def task(self) -> tasks.Task:
        return tasks.for_transform(self.transform)

    def run_members(self, observed_BTF: np.ndarray, known_BLF: np.ndarray, symbol_B: np.ndarray) -> list[np.ndarray]:
        """Every member's prediction of one batch, as the task's `predict` gives it: (B,) or (B, O) float32."""
        feeds = dict(zip(INPUT_NAMES, (observed_BTF, known_BLF, symbol_B)))
        return [session.run([OUTPUT_NAME], feeds)[0] for session in self.sessions]

    def member_chunks(self, rows: RowArrays, sample_ends: np.ndarray,
                      batch_size: int) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
        """(sample positions (B,), [member prediction]) for the samples ending at `sample_ends`, `batch_size` at a
        time in order: the one loop of ONNX inference, for `etft predict --engine onnx` and for `predict`."""
        length, horizon = self.transform.sequence_length, self.transform.horizon
        for start in range(0, len(sample_ends), batch_size):
            positions_B = np.arange(start, min(start + batch_size, len(sample_ends)))
            ends_B = sample_ends[positions_B]
            observed, known = gather_windows(rows.observed, rows.known, ends_B, length, horizon)
            yield positions_B, self.run_members(observed, known, rows.symbol[ends_B])

    def predict(self, data, *, batch_size: int = DEFAULT_BATCH_SIZE, **read) -> pd.DataFrame:
        """Predictions for every bar of `data` (a CSV/Parquet path, or a pandas DataFrame of bars) that has a full
        window: a DataFrame with the columns `etft predict` writes. `read`: the data.* keys that say how to read
        the data (columns, timestamp_format, symbol, ...; READ_KEYS)."""
        if batch_size < 1:
            raise UserError(f"batch_size={batch_size}; allowed: an integer >= 1")
        bad = sorted(set(read) - set(READ_KEYS))
        if bad:
            raise UserError(f"read option(s) {', '.join(bad)}: only the keys that say how to read the data may "
                            f"change (the model was trained on the run's features); allowed: {', '.join(READ_KEYS)}")
        cfg, bars = new_data_config(self.cfg, data, read)
        found = prediction_rows(cfg, self.transform, bars)
        chunks = self.member_chunks(found.rows, found.sample_ends, batch_size)
        parts = [pd.DataFrame(columns) for columns in
                 table_batches(found.rows, found.sample_ends, found.target_known, self.transform, chunks)]
        return pd.concat(parts, ignore_index=True)


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not readable JSON ({err}); export again: "
                        f"`{export_command(path.parent)} --overwrite`") from None
    keys = ("format", "members", "sha256")
    if not isinstance(manifest, dict) or any(k not in manifest for k in keys) or \
            manifest["format"] != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{str(path)!r} is not an export manifest of format {MANIFEST_FORMAT} (needs "
                        f"{', '.join(keys)}; format {found!r}): export the run again with this version: "
                        f"`{export_command(path.parent)} --overwrite`")
    needed = set(manifest["members"]) | {SCALER_JSON, CONFIG_YAML}
    if not manifest["members"] or not needed <= set(manifest["sha256"]):
        raise UserError(f"{str(path)!r} lists no SHA-256 for {', '.join(sorted(needed - set(manifest['sha256'])))}"
                        f" or no member: export again: `{export_command(path.parent)} --overwrite`")
    return manifest


def _checked_file(folder: Path, name: str, digest: str) -> bytes:
    """The bytes of one file the manifest lists, if they hash to its SHA-256."""
    if not isinstance(name, str) or Path(name).name != name:   # a manifest names files of its own folder only
        raise UserError(f"{str(folder / MANIFEST_JSON)!r} lists {name!r}: allowed are file names within the folder")
    path = refuse_link(folder / name)
    if not path.is_file():
        raise UserError(f"{str(path)!r} is missing: the export is incomplete or was changed; export again: "
                        f"`{export_command(folder)} --overwrite`")
    data = path.read_bytes()
    if sha256_of(data) != digest:
        raise UserError(f"{str(path)!r} does not match the SHA-256 in {MANIFEST_JSON} (it was changed or damaged "
                        f"after the export): export again: `{export_command(folder)} --overwrite`")
    return data
