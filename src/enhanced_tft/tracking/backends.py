"""How run.tracking talks to its backends: an MLflow store and runs (MlflowStore, MlflowRun) and TensorBoard event
files (TensorBoardRun). What is logged, when, and what a failure does is tracking.py's: these only write.

Each backend has `name`, `state()` (what tracking.json keeps for a resume), `log(member, values, step)` (member
None: the run itself), `finish(run, members)` and `close(status)`.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from ..config.overrides import flatten  # the config as section.key, as a resume compares it
from ..config.schema import Config, to_yaml
from ..errors import UserError
from ..runs import LOCK_FILE, MLFLOW_ARTIFACTS, MLFLOW_DB, RunFolder

REMOTE_SCHEMES = ("http", "https", "databricks")               # a tracking server keeps the artifacts itself


def config_params(cfg: Config) -> dict[str, str]:
    """The config as MLflow parameters: section.key -> the value as YAML writes it (null, true, [1, 2])."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten(cfg.model_dump(mode="json")).items()}


def artifact_files(run: RunFolder, members: int) -> list[Path]:
    """The run folder's files for MLflow: all but the lock, temporary files and the resumable step checkpoints
    (optimizer state for --resume; the best weights go)."""
    skip = {p for m in range(members) for p in run.step_checkpoints(m)}
    return [p for p in sorted(run.path.rglob("*")) if p.is_file() and not p.is_symlink() and p not in skip
            and p.name != LOCK_FILE and not p.name.startswith(".tmp.")]


class MlflowStore:
    """One MLflow tracking store and experiment (a run's own, or a group's shared with its children)."""

    def __init__(self, uri: str, experiment: str, artifact_root: Path | None):
        from mlflow.tracking import MlflowClient
        self.uri = uri
        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(experiment)
            if found is None:
                try:   # never MLflow's default ./mlruns of the working folder
                    self.experiment_id = self.client.create_experiment(
                        experiment, artifact_location=artifact_root.resolve().as_uri() if artifact_root else None)
                    return
                except Exception:   # another process created it at the same moment
                    found = self.client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
            self.experiment_id = found.experiment_id
        except Exception as err:
            reason = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
            raise UserError(f"run.mlflow_uri={uri!r} (experiment {experiment!r}) cannot be opened: {reason}; allowed: "
                            "null (a SQLite store in the log folder), sqlite:///path/to/mlflow.db, http(s)://host:port "
                            "(MLflow's file store, ./mlruns or file:, needs MLFLOW_ALLOW_FILE_STORE=true)") from None

    @classmethod
    def for_config(cls, cfg: Config, log_dir: Path, saved_uri: str | None = None) -> "MlflowStore":
        """run.mlflow_uri, else the store a resumed run used, else sqlite:///LOG_DIR/mlflow.db."""
        uri = cfg.run.mlflow_uri or saved_uri or f"sqlite:///{(log_dir / MLFLOW_DB).resolve()}"
        remote = urlparse(uri).scheme in REMOTE_SCHEMES
        return cls(uri, cfg.run.mlflow_experiment, None if remote else log_dir / MLFLOW_ARTIFACTS)

    def create_run(self, name: str, parent_id: str | None, cfg: Config | None, tags: dict[str, str]) -> str:
        parent = {"mlflow.parentRunId": parent_id} if parent_id else {}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags={**tags, **parent}).info.run_id
        if cfg is not None:
            self.log(run_id, params=config_params(cfg))
        return run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None, step: int = 0,
            params: dict[str, str] | None = None) -> None:
        from mlflow.entities import Metric, Param
        now = int(time.time() * 1000)
        points = [Metric(re.sub(r"[^\w\-. :/]", "_", k), v, now, step) for k, v in (metrics or {}).items()]
        pairs = [Param(k, v[:6000]) for k, v in (params or {}).items()]
        for start in range(0, max(len(points), len(pairs)), 100):   # MLflow's limit per call: 100 params
            self.client.log_batch(run_id, metrics=points[start:start + 100], params=pairs[start:start + 100])

    def close(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status=status)


class MlflowRun:
    """A run's MLflow run, and its members' nested runs when the ensemble has several."""
    name = "mlflow"

    def __init__(self, store: MlflowStore, run_id: str, members: dict[str, str], nested: bool,
                 save: Callable[[], None]):
        self.store, self.run_id, self.members, self.nested, self.save = store, run_id, members, nested, save

    @classmethod
    def open(cls, store: MlflowStore, cfg: Config, run: RunFolder, saved: dict, parent_id: str | None, name: str,
             save: Callable[[], None]) -> tuple["MlflowRun", bool]:
        """Continue the run tracking.json names (a resume), or start one; True if continued."""
        nested = cfg.train.ensemble_size > 1
        if saved.get("uri") == store.uri and saved.get("run_id"):
            try:
                found = store.client.get_run(saved["run_id"])
            except Exception:   # gone from the store: start a new run, which replays the records
                found = None
            if found is not None and found.info.experiment_id == store.experiment_id:
                logged = found.data.params
                for run_id in [saved["run_id"], *saved.get("members", {}).values()]:
                    store.client.update_run(run_id, status="RUNNING")
                changed = {k: v for k, v in config_params(cfg).items() if k in logged and logged[k] != v}
                for key, value in changed.items():   # a parameter cannot change: the resume's values as tags
                    store.client.set_tag(saved["run_id"], f"resumed_with.{key}", value)
                return cls(store, saved["run_id"], dict(saved.get("members", {})), nested, save), True
        run_id = store.create_run(name, parent_id, cfg, {"etft.run_folder": str(run.path.resolve()),
                                                         "etft.task": cfg.task})
        return cls(store, run_id, {}, nested, save), False

    def state(self) -> dict:
        return {"uri": self.store.uri, "run_id": self.run_id, "members": self.members}

    def _run_of(self, member: int | None) -> str:
        if member is None or not self.nested:
            return self.run_id
        if str(member) not in self.members:
            self.members[str(member)] = self.store.create_run(
                f"member_{member}", self.run_id, None, {"etft.member": str(member)})
            self.save()
        return self.members[str(member)]

    def log(self, member: int | None, values: dict[str, float], step: int) -> None:
        self.store.log(self._run_of(member), values, step)

    def finish(self, run: RunFolder, members: int) -> None:
        for path in artifact_files(run, members):
            folder = path.parent.relative_to(run.path).as_posix()
            self.store.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)

    def close(self, status: str) -> None:
        for run_id in [*self.members.values(), self.run_id]:
            self.store.close(run_id, status)


class TensorBoardRun:
    """Event files in RUN/tensorboard/ (the run's numbers), and member_<k>/ beside them with several members."""
    name = "tensorboard"

    def __init__(self, folder: Path, nested: bool):
        from torch.utils.tensorboard import SummaryWriter
        self.folder, self.nested, self.make, self.writers = folder, nested, SummaryWriter, {}

    def state(self) -> dict:
        return {"dir": self.folder.name}

    def _writer(self, member: int | None):
        name = f"member_{member}" if self.nested and member is not None else ""
        if name not in self.writers:
            self.writers[name] = self.make(str(self.folder / name), flush_secs=10)
        return self.writers[name]

    def log(self, member: int | None, values: dict[str, float], step: int) -> None:
        writer = self._writer(member)
        for key, value in values.items():
            writer.add_scalar(key, value, step)

    def log_config(self, cfg: Config) -> None:
        self._writer(None).add_text("config", "    " + to_yaml(cfg).replace("\n", "\n    "))

    def finish(self, run: RunFolder, members: int) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self, status: str) -> None:
        for writer in self.writers.values():
            writer.close()
