"""Experiment tracking (run.tracking): each run's config, metrics records and summary also go to MLflow and/or
TensorBoard. The run folder stays the record: a tracker is told what the folder receives (RunFolder.on_metrics,
the summary, its files), and a backend that fails mid-run is warned about once and left off; training goes on.

MLflow: one run per `etft train` run, named after its folder, the flattened config as parameters; with
ensemble_size > 1 each member's records go to a nested run member_<k>. Walk-forward folds and `etft tune` trials
are nested runs of a parent (`open_group`). The default store is sqlite:///LOG_DIR/mlflow.db with artifacts in
LOG_DIR/mlartifacts (MLflow 3's file store ./mlruns is off by default). TensorBoard: event files in
RUN/tensorboard/ (member_<k>/ beside them with several members). The backends themselves: tracking/backends.py.

Steps: an epoch record's numbers at step = epoch, under metrics.jsonl's keys (loss/val, val/auc, ...); a logging
window's under window/<key> at step = the member's count of windows (the two kinds would mix in one chart);
summary numbers at step 0. Only the process of global rank 0 tracks. A resume continues the MLflow run named in
RUN/tracking.json; a backend new to the run first replays the records metrics.jsonl already holds.
"""
from __future__ import annotations

import importlib
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

from ..config.schema import Config, load_run_config
from ..errors import UserError
from ..runs import CONFIG_YAML, SUMMARY_JSON, TENSORBOARD_DIR, TRACKING_JSON, RunFolder
from .backends import MlflowRun, MlflowStore, TensorBoardRun

log = logging.getLogger("enhanced_tft.tracking")

INSTALL = 'pip install "enhanced-tft[tracking]"'
MODULES = {"mlflow": "mlflow", "tensorboard": "tensorboard"}   # run.tracking name -> the library it needs
COORDINATES = ("kind", "member", "epoch", "step")              # where a record sits, not what it measured
MEMBER_KEYS = ("best_val_loss", "best_epoch", "epochs_run", "optimizer_steps", "samples_per_s")


# ---------------------------------------------------------------- what is logged

def missing_library(name: str, module: str | None = None) -> str | None:
    """Why run.tracking cannot use `name` here (its library does not import), or None."""
    module = module or MODULES[name]
    try:
        importlib.import_module(module)
    except ImportError as err:
        return (f"run.tracking lists {name!r} but the {module} library cannot be imported ({err}); install the "
                f"tracking extra with: {INSTALL} (or remove {name} from run.tracking)")
    return None


def require(names: Iterable[str]) -> None:
    """At the start of a run, before any training: UserError naming the pip command if a tracker is missing."""
    problems = [p for p in map(missing_library, dict.fromkeys(names)) if p]
    if problems:
        raise UserError("; ".join(problems))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_leaves(tree: dict, prefix: str = "") -> dict[str, float]:
    """Every number in nested mappings, keyed by its path joined with '/' (text, lists and flags left out)."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(numeric_leaves(value, f"{prefix}{key}/"))
        elif _number(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def summary_metrics(summary: dict) -> dict[str, float]:
    """The numbers of summary.json: the ensemble's test metrics (test/...), the naive rule's (baseline/...), LightGBM's
    (strong_baseline/...), the blend's (blend/...), the quant figures (quant/...), the mean member's (mean_member/..., with several), and
    best_val_loss, the mean over members of each one's best (what etft tune minimizes)."""
    ensemble = summary["ensemble"]
    parts = {"test": summary["test"], "baseline": {k: v for k, v in summary["baseline"].items() if k != "output"},
             "strong_baseline": (summary.get("strong_baseline") or {}).get("test") or {},
             "blend": (summary.get("blend") or {}).get("test") or {},
             "quant": summary.get("quant") or {}}
    if ensemble["size"] > 1:
        parts["mean_member"] = ensemble["mean_member"]
    metrics = numeric_leaves(parts)
    metrics["best_val_loss"] = statistics.fmean(m["best_val_loss"] for m in ensemble["members"])
    metrics.update({k: float(summary[k]) for k in ("samples_per_s", "peak_memory_bytes", "wall_time_s")
                    if _number(summary.get(k))})
    return metrics


def member_metrics(member: dict) -> dict[str, float]:
    """One member's record in summary.json: its test metrics and how its training went."""
    return {**numeric_leaves({"test": member["test"]}),
            **{k: float(member[k]) for k in MEMBER_KEYS if _number(member.get(k))}}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def _stop_status(finished: bool, error: BaseException | None = None) -> str:
    """MLflow's status of a run closing now: FINISHED once its summary was logged; KILLED when Ctrl-C, a signal
    (train_run returns, resumable) or a pruner stopped it; FAILED on any other exception (`error`, else the one
    propagating through the caller's `finally`)."""
    if finished:
        return "FINISHED"
    error = error or sys.exc_info()[1]
    pruned = getattr(sys.modules.get("optuna"), "TrialPruned", KeyboardInterrupt)
    return "KILLED" if error is None or isinstance(error, (KeyboardInterrupt, pruned)) else "FAILED"


# ---------------------------------------------------------------- a run, a group of runs

class Tracker:
    """A run's trackers, told what its folder receives. This base records nothing (run.tracking empty, or a
    process other than rank 0)."""

    def log_record(self, record: dict) -> None:
        """One record as metrics.jsonl receives it (RunFolder.on_metrics)."""

    def finish(self, summary: dict) -> None:
        """The run completed: summary.json's numbers and the folder's files."""

    def close(self) -> None:
        """Status FINISHED after finish, else KILLED or FAILED (see _stop_status)."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunTracker(Tracker):
    def __init__(self, run: RunFolder, backends: list):
        self.run, self.backends, self.finished = run, backends, False
        self.logged: dict[int, int] = {}    # member -> its records in metrics.jsonl that the backends hold
        self.windows: dict[int, int] = {}   # member -> its logging windows so far (their step)

    def _each(self, call: Callable[[Any], None], backends: list | None = None) -> None:
        """`call` on every backend; one that raises is warned about once and left off: training goes on."""
        for backend in [b for b in (self.backends if backends is None else backends) if b in self.backends]:
            try:
                call(backend)
            except Exception as err:
                log.warning("tracking: %s failed (%s: %s); training goes on without it, the run folder %s keeps "
                            "every record", backend.name, type(err).__name__, _first_line(err), self.run.path)
                self.backends.remove(backend)
                try:
                    backend.close("FAILED")
                except Exception:
                    pass

    def _point(self, record: dict) -> tuple[int, dict[str, float], int]:
        member = int(record.get("member", 0))
        self.logged[member] = self.logged.get(member, 0) + 1
        prefix, step = "", int(record.get("epoch", 0))
        if record.get("kind") == "window":
            self.windows[member] = self.windows.get(member, 0) + 1
            prefix, step = "window/", self.windows[member]
        return member, {prefix + k: float(v) for k, v in record.items() if k not in COORDINATES and _number(v)}, step

    def replay(self, records: list[dict], fresh: list) -> None:
        """A resume's earlier records: counted, and sent to the backends new to this run."""
        for record in records:
            member, values, step = self._point(record)
            self._each(lambda b: b.log(member, values, step), fresh)

    def log_record(self, record: dict) -> None:
        member, values, step = self._point(record)
        self._each(lambda b: b.log(member, values, step))

    def save(self) -> None:
        self.run.write_json(TRACKING_JSON, {b.name: b.state() for b in self.backends})

    def finish(self, summary: dict) -> None:
        records = self.run.metrics_records()   # members trained by other ranks (train.distribute=members)
        for member in sorted({int(r.get("member", 0)) for r in records}):
            for record in [r for r in records if int(r.get("member", 0)) == member][self.logged.get(member, 0):]:
                self.log_record(record)
        metrics, members = summary_metrics(summary), summary["ensemble"]["members"]
        self._each(lambda b: b.log(None, metrics, 0))
        for record in members:   # an ensemble of one: its numbers are the run's
            values = {k: v for k, v in member_metrics(record).items() if len(members) > 1 or k not in metrics}
            self._each(lambda b: b.log(record["member"], values, 0))
        self._each(lambda b: b.finish(self.run, len(members)),
                   sorted(self.backends, key=lambda b: b.name == "mlflow"))   # event files flushed before upload
        self.finished = True

    def close(self) -> None:
        status = _stop_status(self.finished)
        self.run.on_metrics = None
        self._each(lambda b: b.close(status))


def open_run(cfg: Config, run: RunFolder, parent: "Group | None" = None, resuming: bool = False,
             main: bool = True) -> Tracker:
    """The trackers of one run, subscribed to its folder's records; a no-op Tracker unless run.tracking asks
    and `main` (the process is torchrun's rank 0, also where train.distribute=members hands a rank a fold). A store that cannot be opened is a UserError before training, except for a run of a
    group (a fold, a trial), which then goes on untracked with a warning."""
    if not cfg.run.tracking or not main:
        return Tracker()
    require(cfg.run.tracking)
    saved = run.read_json(TRACKING_JSON) if resuming and (run.path / TRACKING_JSON).is_file() else {}
    nested = cfg.train.ensemble_size > 1
    tracker = RunTracker(run, [])
    fresh = []
    try:
        if "tensorboard" in cfg.run.tracking:
            board = TensorBoardRun(run.path / TENSORBOARD_DIR, nested)
            tracker.backends.append(board)
            if "tensorboard" not in saved:
                fresh.append(board)
                board.log_config(cfg)
        if "mlflow" in cfg.run.tracking and not (parent is not None and parent.failed):
            before = saved.get("mlflow", {})
            store = (parent.store if parent is not None and parent.store is not None else
                     MlflowStore.for_config(cfg, run.path.parent, before.get("uri")))
            name = parent.child_name(cfg) if parent is not None and parent.child_name else run.path.name
            backend, continued = MlflowRun.open(store, cfg, run, before, parent.run_id if parent else None, name,
                                                tracker.save)
            tracker.backends.append(backend)
            if not continued:
                fresh.append(backend)
    except Exception as err:
        tracker.close()
        if parent is not None:
            log.warning("tracking of %s skipped: %s", run.path, err)
            return Tracker()
        if isinstance(err, UserError):
            raise
        raise UserError(f"run.tracking {cfg.run.tracking} could not start: {type(err).__name__}: {err}") from None
    tracker.replay(run.metrics_records() if resuming else [], fresh)
    tracker.save()
    run.on_metrics = tracker.log_record
    if parent is not None:
        parent.children.add(run.path.resolve())
    return tracker


class Group:
    """A parent MLflow run whose children are etft runs: a walk-forward's folds, an `etft tune` study's trials.
    Without MLflow (or off rank 0) it records nothing and its children are top-level runs."""

    def __init__(self, store: MlflowStore | None = None, run_id: str | None = None,
                 child_name: Callable[[Config], str] | None = None):
        self.store, self.run_id, self.child_name = store, run_id, child_name
        self.children: set[Path] = set()
        self.failed, self.code = False, 0

    def _guarded(self, call: Callable[[], None]) -> None:
        if self.store is None:
            return
        try:
            call()
        except Exception as err:
            log.warning("tracking: the MLflow parent run failed (%s: %s); training goes on without it",
                        type(err).__name__, _first_line(err))
            self.store, self.failed = None, True

    def ended(self, code: int) -> int:
        """Note the exit code (not 0: stopped by a signal) and pass it on."""
        self.code = code
        return code

    def log(self, metrics: dict[str, float], files: Iterable[Path]) -> None:
        def call() -> None:
            self.store.log(self.run_id, metrics)
            for path in files:
                self.store.client.log_artifact(self.run_id, str(path))
        self._guarded(call)

    def adopt(self, folder: Path) -> None:
        """A finished run folder this process did not track (a fold another rank trained), as a child."""
        if self.store is None or folder.resolve() in self.children:
            return
        run = RunFolder(folder)
        try:
            with open_run(load_run_config(run.file(CONFIG_YAML)), run, self, resuming=True) as tracker:   # replays
                tracker.finish(run.read_json(SUMMARY_JSON))
        except Exception as err:   # the folds are trained and compared: a tracking failure only warns
            log.warning("tracking: %s not added to the MLflow parent run: %s", folder, _first_line(err))

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, kind, error, traceback) -> None:
        status = _stop_status(error is None and self.code == 0, error)
        self._guarded(lambda: self.store.close(self.run_id, status))


def fold_name(cfg: Config) -> str:
    """A walk-forward fold's run name in its parent: fold_<k>."""
    return f"fold_{cfg.data.fold}"


def open_group(cfg: Config, name: str, child_name: Callable[[Config], str], main: bool = True) -> Group:
    """The parent run `name`_<time> of a walk-forward or a tune study, in cfg's store; its children are named
    by child_name(their config). Only where `main` (torchrun's rank 0)."""
    require(cfg.run.tracking)
    if "mlflow" not in cfg.run.tracking or not main:
        return Group()
    log_dir = Path(cfg.run.log_dir)
    try:
        log_dir.mkdir(parents=True, exist_ok=True)   # the SQLite store lives there
    except OSError as err:
        raise UserError(f"run.log_dir={str(log_dir)!r} cannot be created: {err.strerror}") from None
    store = MlflowStore.for_config(cfg, log_dir)
    run_id = store.create_run(f"{name}_{time.strftime('%Y%m%d_%H%M%S')}", None, cfg, {"etft.group": name})
    return Group(store, run_id, child_name)


def log_walk_forward(group: Group | None, summary: dict, out: Path) -> None:
    """The walk-forward's numbers (each metric's mean, sd and count over the folds) and files on its parent run;
    folds another rank trained (train.distribute=members) join as children from their folders."""
    if group is None or group.store is None:
        return
    for fold in summary["folds"]:
        group.adopt(Path(fold["run"]))
    metrics = {**numeric_leaves(summary["over_folds"]), **numeric_leaves({"quant": summary["quant_over_folds"]})}
    group.log(metrics, [p for p in (out, out.with_suffix(".png")) if p.is_file()])
