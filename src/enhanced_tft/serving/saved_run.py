"""A finished run folder as prediction reads it: its config, its fitted transform, its summary, its members
(torch weights, or its ONNX export), and whether its own data is still what it was trained on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import tasks
from ..config import schema as config_mod
from ..config.schema import Config
from ..data import fingerprint as fp
from ..data.transform import Transform
from ..errors import CheckpointError, UserError, WeightsMismatch
from ..model.build import dims_for, load_model
from ..runs import CONFIG_YAML, DATA_JSON, ONNX_EXPORT, SCALER_JSON, SUMMARY_JSON, RunFolder, load_checkpoint
from .onnx_model import OnnxModel


@dataclass
class SavedRun:
    """What prediction needs from a run folder: its config, its fitted transform, its summary, its members."""
    folder: RunFolder
    cfg: Config
    transform: Transform
    summary: dict

    @property
    def path(self) -> Path:
        return self.folder.path

    @classmethod
    def open(cls, path: str | Path) -> "SavedRun":
        folder = RunFolder(path)
        missing = folder.missing(CONFIG_YAML, SCALER_JSON, SUMMARY_JSON)
        if missing:
            raise UserError(f"--run {str(folder.path)!r} lacks {', '.join(missing)}: not a finished run folder "
                            "(a folder like logs/training_20261128_101500)")
        summary = folder.read_json(SUMMARY_JSON)
        if summary.get("status") != "completed":
            raise UserError(f"--run {str(folder.path)!r} did not finish (status {summary.get('status')!r}); finish "
                            f"it first with: etft train --resume {folder.path}")
        source = str(folder.file(SCALER_JSON))
        transform = Transform.from_dict(folder.read_json(SCALER_JSON), source)
        cfg = config_mod.load_run_config(folder.file(CONFIG_YAML))
        transform.check_against(cfg, source)
        trained = summary.get("data", {}).get("transform_sha256")   # absent in runs of older versions
        if trained is not None and trained != transform.sha256():
            raise UserError(f"{source} was changed after training (its values no longer hash to those summary.json "
                            "recorded): reordered symbols or edited scales would feed the model other inputs than it "
                            "learned. Restore the run's own scaler.json")
        return cls(folder, cfg, transform, summary)

    @property
    def task(self) -> tasks.Task:
        return tasks.for_transform(self.transform)

    def load_models(self, device: torch.device) -> list[torch.nn.Module]:
        """Every member's best weights; torch.load(weights_only=True) underneath: no code in a file runs."""
        paths = [self.folder.best_checkpoint(m) for m in range(self.cfg.train.ensemble_size)]
        absent = [str(p.relative_to(self.path)) for p in paths if not p.is_file()]
        if absent:
            raise UserError(f"--run {str(self.path)!r} lacks {', '.join(absent)}: its members' weights")
        models = []
        for path in paths:
            try:
                models.append(load_model(self.cfg.model, dims_for(self.transform), self.task.output_size,
                                         load_checkpoint(path), device))
            except WeightsMismatch as err:
                raise CheckpointError(f"checkpoint {str(path)!r} does not fit the run's model ({CONFIG_YAML}): "
                                      f"{err}") from None
        return models

    def onnx_model(self) -> OnnxModel:
        """The run's own export (RUN/onnx), refused if it was exported from other fitted values than the run's."""
        model = OnnxModel.open(self.path / ONNX_EXPORT, threads=torch.get_num_threads())   # as many as torch would use
        if model.transform.sha256() != self.transform.sha256() or len(model.sessions) != self.cfg.train.ensemble_size:
            raise UserError(f"{str(model.folder)!r} is not an export of this run (its scaler.json or its number of members "
                            f"differs from the run's): export again: `etft export --run {self.path} --overwrite`")
        return model


def transform_differences(saved: Transform, rebuilt: Transform) -> list[str]:
    """The fields in which two transforms differ (numbers: beyond float rounding)."""
    out = []
    for key, before in saved.to_dict().items():
        after = getattr(rebuilt, key)
        numbers = isinstance(before, float) or (isinstance(before, list) and bool(before)
                                                and isinstance(before[0], float) and len(before) == len(after))
        if not (np.allclose(before, after, rtol=1e-6, atol=0) if numbers else before == after):
            out.append(f"{key}: {before!r:.80} at training, {after!r:.80} now")
    return out


def check_own_data(run: SavedRun, allow_changed: bool, bars=None) -> None:
    """The run's own data is still what it was trained on (data.json's fingerprint), or the user says go on.
    `bars`: the checked bars of the DataFrame a data.source=frame run was trained on, given again."""
    if run.folder.missing(DATA_JSON):
        return   # a run of an older version: the transform comparison below still applies
    fp.check_unchanged(
        run.folder.read_json(DATA_JSON), run.cfg, allow_changed,
        lambda changed, was: (f"the run's data changed since training ({changed}): its splits are no longer those of "
                              f"{was}. Restore that file, predict the new one with --data PATH, or add "
                              "--allow-changed-data (refused anyway if its fitted scaling differs)"),
        "predicting the run's changed data", bars)
