"""`etft tune`: an Optuna study over a YAML search space. Each trial is one `etft train` run (train_run) in
LOG_DIR/tune_<study>/trial_<number>/, scored by its validation loss only (never the test split), pruned epoch by
epoch, and kept in an RDB storage that several processes or machines share. With --folds K a trial trains K
walk-forward folds (trial_<number>/fold_<k>/) and scores the mean of their validation losses: the last K
validation blocks before the test split, each fold trained on the bars before its block.

Choices, documented in the README:
- `--trials N` is the study's total, not each process's: a process starts a trial only while the study holds
  fewer than N trials (finished, running or queued), so several processes on one storage share N, and a study
  run again after a crash goes on to N; queued trials (retries, enqueued ones) always run. A failed trial counts
  (a space that always fails must end), except one that a heartbeat retry replaced, one that Ctrl-C stopped,
  or one that lost the race for the last place to another process (`surplus`, FAIL at once, untrained).
- A sampled config that does not validate (num_heads not dividing d_model, say) is PRUNED at once, untrained,
  with the reason in the trial's `note` and a violated constraint so that TPE moves away from it; the default
  space is valid by construction (d_model in steps of 32, num_heads 1, 2, 4 or 8).
- Pruning: MedianPruner on member 0's validation loss, reported after each epoch (step = epoch).
- A killed process leaves its trial RUNNING; after 2 heartbeats without news it is failed and queued again
  (RetryHeartbeatStaleTrialCallback) when any process next looks at the study.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState
from pydantic import BaseModel, ValidationError

from ..config import schema as config_mod
from ..config.schema import Config
from ..config.yaml_io import load_yaml_text
from ..data.pipeline import bar_source, split_plan
from ..errors import ConfigError, NonFiniteGiveUp, OutOfMemoryGiveUp, TrialFailed, UserError
from ..runs import SUMMARY_JSON, RunFolder
from ..runtime.signals import STOP
from ..tracking import tracker as tracking
from ..training.recipe import TrainRequest, train_run

log = logging.getLogger("enhanced_tft.tune")

# LOG_DIR/tune_<study>/ is this module's folder: it names its files
BEST_CONFIG_YAML = "best_config.yaml"
TRIALS_CSV = "trials.csv"
TUNE_REPORT_HTML = "tune_report.html"
TUNE_SUMMARY_JSON = "tune_summary.json"
PARAM_TYPES = {"int": ("low", "high", "step", "log"), "float": ("low", "high", "step", "log"),
               "categorical": ("choices",)}
# what a trial may change: the model, its training and the window length; not what the validation loss is
# measured on (the data, its split, the targets, the loss function), or the trials would not compare
TUNABLE = ("model.*", "train.*", "data.sequence_length", "seed")
NOT_TUNABLE = ("train.device", "train.regression_loss", "train.huber_delta")
PRUNER_STARTUP_TRIALS = 3   # complete trials before the median means anything
PRUNER_WARMUP_EPOCHS = 1    # earliest epoch a trial can be pruned at
SQLITE_TIMEOUT_S = 30       # wait this long for another process's write instead of "database is locked"
MAX_RETRIES = 2             # a trial whose process died is queued again at most this often
MAX_INPUT_FAILURES = 3      # trials in a row failing on bad input (missing data, full disk) stop the study
MAX_FOLDS = 100             # data.walk_forward_folds' own limit


# ---------------------------------------------------------------- the search space

@dataclass(frozen=True)
class Param:
    """One entry of the space: a config key and the distribution its values are drawn from."""
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)


def load_space(path: str | Path) -> tuple[Param, ...]:
    path = Path(path)
    try:
        raw = load_yaml_text(path.read_text())
    except OSError as err:
        raise UserError(f"--space {str(path)!r} cannot be read: {err.strerror}; give a YAML search space such as "
                        "configs/tune_space.yaml") from None
    except Exception as err:   # yaml.YAMLError, or an alias the safe loader refuses
        raise UserError(f"--space {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    return parse_space(raw, f"--space {str(path)!r}")


def parse_space(raw: Any, where: str = "search space") -> tuple[Param, ...]:
    """Validate a mapping `config.key: {type, low, high, log, step, choices}`; UserError naming the entry."""
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: a search space is a mapping of config keys to distributions, e.g. "
                        "`model.d_model: {type: int, low: 16, high: 128, step: 16}`")
    return tuple(_param(str(key), entry, f"{where}: {key}") for key, entry in raw.items())


def _param(key: str, entry: Any, where: str) -> Param:
    _check_key(key, where)
    if not isinstance(entry, dict) or entry.get("type") not in PARAM_TYPES:
        raise UserError(f"{where}: needs a mapping with type int, float or categorical, got {entry!r}")
    kind = entry["type"]
    unknown = sorted(set(entry) - {"type", *PARAM_TYPES[kind]})
    if unknown:
        raise UserError(f"{where}: {', '.join(unknown)} not allowed for type {kind}; allowed: "
                        f"{', '.join(PARAM_TYPES[kind])}")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices or len(set(map(repr, choices))) < len(choices) or not all(
                v is None or isinstance(v, (bool, int, float, str)) for v in choices):
            raise UserError(f"{where}: choices={choices!r}; allowed: a list of distinct numbers, strings, true/false")
        param = Param(key, kind, choices=tuple(choices))
        values = {f"choice {v!r}": v for v in choices}
    else:
        number = int if kind == "int" else (int, float)
        low, high, step, log_scale = entry.get("low"), entry.get("high"), entry.get("step"), entry.get("log", False)
        for name, value in (("low", low), ("high", high), ("step", step)):
            if (value is not None or name != "step") and (not isinstance(value, number) or isinstance(value, bool)
                                                          or not math.isfinite(value)):
                raise UserError(f"{where}: {name}={value!r}; allowed: {'an integer' if kind == 'int' else 'a number'}")
        if not low < high:
            raise UserError(f"{where}: low={low} is not below high={high}; to fix a value use --set {key}=VALUE")
        if not isinstance(log_scale, bool) or (log_scale and low <= 0):
            raise UserError(f"{where}: log={log_scale!r} with low={low}; allowed: log true needs low > 0")
        if step is not None and (step <= 0 or log_scale or (kind == "int" and (high - low) % step)):
            raise UserError(f"{where}: step={step}; allowed: a step > 0 that divides high - low, without log")
        cast = int if kind == "int" else float
        param = Param(key, kind, cast(low), cast(high), step, log_scale)
        values = {"low": param.low, "high": param.high}
    for name, value in values.items():
        _check_value(key, value, f"{where}: {name}")
    return param


def _sections() -> dict[str, type]:
    return {name: field.annotation for name, field in Config.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def _check_key(key: str, where: str) -> None:
    sections, parts = _sections(), key.split(".")
    if len(parts) == 2 and parts[0] in sections:
        if parts[1] not in sections[parts[0]].model_fields:
            raise UserError(f"{where}: unknown config key {key!r}; allowed keys of {parts[0]}: "
                            f"{', '.join(sections[parts[0]].model_fields)}")
    elif len(parts) != 1 or parts[0] not in Config.model_fields or parts[0] in sections:
        raise UserError(f"{where}: unknown config key {key!r}; allowed: section.key with section one of "
                        f"{', '.join(sections)} (e.g. model.d_model), or seed")
    if key in NOT_TUNABLE or not any(key == t or (t.endswith("*") and key.startswith(t[:-1])) for t in TUNABLE):
        raise UserError(f"{where}: {key} cannot be tuned: the trials' validation losses would not compare (or it "
                        f"does not change training); set it with --set for every trial. Allowed: {', '.join(TUNABLE)}"
                        f" but {', '.join(NOT_TUNABLE)}")


def _check_value(key: str, value: Any, where: str) -> None:
    """The value alone is one the config accepts (checks between keys, heads dividing d_model, come per trial)."""
    *section, name = key.split(".")
    raw: dict = {section[0]: {name: value}} if section else {name: value}
    try:
        Config.model_validate(raw)
    except ValidationError as err:
        for item in err.errors():
            if tuple(map(str, item["loc"])) == tuple(key.split(".")):
                raise UserError(f"{where}={value!r} is not a value of {key}: {item['msg']}") from None


def trial_config(base: Config, params: dict[str, Any]) -> Config:
    """`base` with the trial's values; ConfigError when they do not go together."""
    sections: dict[str, Any] = {}
    for key, value in params.items():
        *section, name = key.split(".")
        if section:
            sections.setdefault(section[0], {})[name] = value
        else:
            sections[name] = value
    return config_mod.update(base, **sections)


# ---------------------------------------------------------------- storage and study

@contextmanager
def quiet_optuna():
    """Optuna's experimental-feature warnings (heartbeats, constant liar) are noise to a user of etft tune."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def shown_url(url: str) -> str:
    """The storage URL without its password (for messages and the report)."""
    import sqlalchemy
    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:   # not a URL at all: open_storage says so
        return url


def open_storage(url: str, heartbeat_s: int) -> optuna.storages.RDBStorage:
    """The RDB storage at `url` with heartbeats, or UserError saying what is wrong and what is allowed."""
    import sqlalchemy
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    stale = ({"heartbeat_stale_trial_callback": retry(max_retry=MAX_RETRIES)} if retry else   # optuna >= 4.9
             {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=MAX_RETRIES)})
    try:
        for attempt in range(1, 6):
            try:
                return optuna.storages.RDBStorage(
                    url, engine_kwargs={"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite")
                    else {}, heartbeat_interval=heartbeat_s, grace_period=2 * heartbeat_s, **stale)
            except sqlalchemy.exc.DBAPIError as err:   # two processes creating the tables at once: the other won
                if attempt == 5 or not (isinstance(err, sqlalchemy.exc.IntegrityError) or "already exists" in str(err)):
                    raise
                time.sleep(0.1 * 2 ** attempt)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, ValueError, RuntimeError) as err:
        reason = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise UserError(f"--storage {shown_url(url)!r} cannot be opened: {reason}; allowed: a SQLAlchemy URL whose "
                        "database can be reached and whose driver is installed, e.g. sqlite:///tune.db or "
                        "postgresql://user@host/db (pip install psycopg2-binary)") from None


class TrialSeededTPE(optuna.samplers.BaseSampler):
    """TPE seeded from (config seed, trial number): a study run again draws the same trials, and processes sharing
    a study draw different ones (one seed in every process would repeat the random startup trials)."""

    def __init__(self, seed: int):
        self.seed = seed
        self.inner = self._tpe(seed)

    def _tpe(self, seed: int) -> optuna.samplers.TPESampler:
        # constant liar: a running trial counts as a bad one, so parallel processes spread out
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)

    def before_trial(self, study, trial) -> None:
        self.inner = self._tpe(self.seed + trial.number)
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)


def open_study(storage, name: str, base: Config, space: tuple[Param, ...], folds: int = 1) -> optuna.Study:
    """Create the study, or join it; refused when it was started with another space, base config or --folds."""
    study = optuna.create_study(storage=storage, study_name=name, direction="minimize", load_if_exists=True,
                                sampler=TrialSeededTPE(base.seed),
                                pruner=optuna.pruners.MedianPruner(PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS))
    if study.direction != optuna.study.StudyDirection.MINIMIZE:
        raise UserError(f"study {name!r} maximizes; etft tune minimizes the validation loss: give another --study")
    mine = {"space": [asdict(p) | {"choices": list(p.choices)} for p in space], "base": _comparable(base, space),
            "folds": folds}
    for attr, value in mine.items():
        first = study.user_attrs.get(attr)
        if attr == "folds" and first is None and study.get_trials(deepcopy=False):
            first = 1   # a study begun before --folds existed scored one split
        if attr == "folds" and first is not None and first != value:
            raise UserError(f"study {name!r} was started with --folds {first}; its trials would not compare with "
                            f"--folds {value}. Use --folds {first}, or another --study")
        if first is None:
            study.set_user_attr(attr, value)
        elif json.dumps(first, sort_keys=True) != json.dumps(value, sort_keys=True):
            what = ("search space (--space)" if attr == "space" else "base config (--config, --set): " + ", ".join(
                f"{k}={first.get(k)!r} there, {value.get(k)!r} here" for k in sorted(set(first) | set(value))
                if first.get(k) != value.get(k)))
            raise UserError(f"study {name!r} was started with another {what}; its trials would not compare. "
                            "Use the study's settings, or another --study")
    return study


def _comparable(base: Config, space: tuple[Param, ...]) -> dict[str, Any]:
    """The base config as `section.key: value`, without what may differ between processes or does not reach a
    trial: tuned keys, run.*, the device, the strong baseline (off in trials)."""
    flat = {}
    for section, values in base.model_dump(mode="json").items():
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            flat[f"{section}.{key}" if key else section] = value
    skip = {p.key for p in space} | {"train.device", "train.strong_baseline"}
    return {k: v for k, v in flat.items() if k not in skip and not k.startswith("run.")}


# ---------------------------------------------------------------- trials

def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count towards --trials: all but failed ones that a retry replaced, that a signal stopped,
    or that lost the race for the last place (surplus)."""
    replaced = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return [t for t in trials if t.state != TrialState.FAIL
            or not (t.number in replaced or t.user_attrs.get("not_counted"))]


def fold_configs(cfg: Config, folds: int) -> list[Config]:
    """What one score trains: `cfg` itself (folds=1, today's split), or walk-forward fold k of `folds` for each k
    (data/pipeline.py cuts them: fold k validates on the block before its own test block, and trains on all bars
    before it), the last fold first. The last fold is the plain split (to a row of rounding): its validation block is
    the last one before the test split; every fold's train and validation blocks end before the test split starts,
    and every earlier fold's test block too."""
    if folds == 1:
        return [cfg]
    return [config_mod.update(cfg, data={"walk_forward_folds": folds, "fold": k}) for k in reversed(range(folds))]


def max_folds(base: Config) -> int:
    """The most folds the base config's fractions allow, as the config's own check of walk-forward folds decides
    (val_fraction + folds x test_fraction below 0.9)."""
    most = 1
    for folds in range(2, MAX_FOLDS + 1):
        try:
            config_mod.update(base, data={"walk_forward_folds": folds, "fold": folds - 1})
        except ConfigError:
            break
        most = folds
    return most


def run_score(path: Path) -> float:
    """A finished run's score: the mean over its members of each member's best validation loss."""
    members = RunFolder(path).read_json(SUMMARY_JSON)["ensemble"]["members"]
    return sum(m["best_val_loss"] for m in members) / len(members)


class Stopped(Exception):
    """A signal stopped a training of a score: its exit code (130, 143) and run folder."""

    def __init__(self, code: int, path: Path):
        super().__init__(f"stopped by {'SIGTERM' if code == 143 else 'SIGINT'}")
        self.code, self.path = code, path


class Objective:
    """One trial: its config from the space, trained as `etft train` would (once per fold with --folds K), scored by
    the mean over the folds of the mean over members of each member's best validation loss."""

    def __init__(self, base: Config, space: tuple[Param, ...], folder: Path, num_trials: int,
                 console: Callable[[], Any] | None = None, folds: int = 1):
        self.base, self.space, self.folder, self.num_trials = base, space, folder, num_trials
        self.console = console            # context manager that quiets the trainings' console lines
        self.folds = folds
        self.stop_code = 0                # 130 / 143: a signal stopped a trial; start no other
        self.input_failures = 0
        self.tracking: tracking.Group | None = None   # the study's parent run while run_study runs
        self._source = None               # the bars' lengths and time span, read once for the folds' split plans

    def __call__(self, trial: optuna.Trial) -> float:
        trial.set_user_attr("pid", os.getpid())   # which worker process ran it
        trials = trial.study.get_trials(deepcopy=False)
        me = next(t for t in trials if t.number == trial.number)
        queued = "fixed_params" in me.system_attrs or "failed_trial" in me.system_attrs   # enqueued, or a retry
        earlier = counted([t for t in trials if t.number < trial.number])
        if len(earlier) >= self.num_trials and not queued:   # another process took the last place at the same time
            trial.set_user_attr("not_counted", "surplus")
            raise TrialFailed(f"surplus: the study had its {self.num_trials} trials when this one started")
        params = {p.key: p.suggest(trial) for p in self.space}
        try:
            cfg = trial_config(self.base, params)
        except ConfigError as err:
            reason = " ".join(str(err).removeprefix("invalid config:").split())
            trial.set_user_attr("note", f"invalid config, not trained: {reason}")
            if hasattr(trial, "set_constraint"):   # optuna >= 5: TPE learns to avoid the region
                trial.set_constraint("valid_config", 1.0)
            raise optuna.TrialPruned(f"invalid config: {reason}") from None
        trial.set_user_attr("config", cfg.model_dump(mode="json"))
        return self._train(trial, cfg)

    def split_plan(self, cfg: Config) -> dict:
        """Where `cfg`'s splits lie (data/pipeline.py's split_plan), the bars' lengths and span read once."""
        if self._source is None:
            self._source = bar_source(self.base)
        return split_plan(cfg, self._source)

    def score(self, cfg: Config, folder: Path,
              epoch_hook: Callable[[dict], None] | None = None) -> tuple[float, list[dict]]:
        """Train `cfg` in `folder` (once per fold), and score it: the mean of the folds' validation losses, and what
        each fold was (fold, val loss, run folder, its splits). `epoch_hook` sees the first fold trained only (the
        last fold: with one fold, the run today's etft tune trains), so that the pruner compares like with like."""
        records = []
        for fold_cfg in fold_configs(cfg, self.folds):
            fold = fold_cfg.data.fold
            fold_folder = folder if fold is None else folder / f"fold_{fold}"
            # LightGBM answers "does it beat the strong baseline" for the best config, not for every trial
            run_cfg = config_mod.update(fold_cfg, run={"log_dir": str(fold_folder)}, train={"strong_baseline": False})
            hook = epoch_hook if not records else None
            with self.console() if self.console else nullcontext():
                code, path = train_run(run_cfg, TrainRequest(epoch_hook=hook), group=self.tracking)
            if code != 0:
                raise Stopped(code, path)
            record = {"fold": fold, "val_loss": run_score(path), "run": str(Path(path).resolve())}
            if self.folds > 1:
                record["splits"] = self.split_plan(fold_cfg)
            records.append(record)
        records.sort(key=lambda r: r["fold"] or 0)
        return sum(r["val_loss"] for r in records) / len(records), records

    def _train(self, trial: optuna.Trial, cfg: Config) -> float:
        import torch

        folder = self.folder / f"trial_{trial.number:04d}"
        trial.set_user_attr("run", str(folder.resolve()))   # the run folder inside, once it exists
        try:
            value, folds = self.score(cfg, folder, partial(report_epoch, trial))
        except (UserError, OutOfMemoryGiveUp, NonFiniteGiveUp, torch.OutOfMemoryError) as err:
            message = " ".join(str(err).split())[:500]
            trial.set_user_attr("note", message)
            self.input_failures = self.input_failures + 1 if isinstance(err, UserError) else 0
            if self.input_failures >= MAX_INPUT_FAILURES:
                raise UserError(f"{MAX_INPUT_FAILURES} trials in a row failed on their input, the last with: "
                                f"{message}") from None
            raise TrialFailed(message) from None
        except Stopped as stopped:
            self.stop_code = stopped.code
            trial.set_user_attr("note", f"{stopped}; resumable: etft train --resume {stopped.path}")
            trial.set_user_attr("not_counted", "interrupted")   # a run of the study again makes up for it
            raise TrialFailed(str(stopped)) from None
        finally:   # the latest run folder, also of a fold that failed
            runs = sorted(folder.rglob("training_*"), key=lambda p: p.stat().st_mtime)
            if runs:
                trial.set_user_attr("run", str(runs[-1].resolve()))
        self.input_failures = 0
        if self.folds > 1:
            trial.set_user_attr("folds", folds)
            trial.set_user_attr("run", folds[-1]["run"])   # the last fold: the split etft train would train
        return value


def report_epoch(trial: optuna.Trial, record: dict) -> None:
    """The epoch hook: member 0's validation loss to the pruner, which may stop the training here."""
    if record["member"] != 0:
        return
    loss, epoch = record["loss/val"], record["epoch"]
    trial.report(loss, epoch)
    if trial.should_prune():
        trial.set_user_attr("note", f"at epoch {epoch}: val loss {loss:.5g}, worse than the median of the "
                                    "earlier trials there")
        raise optuna.TrialPruned(f"pruned at epoch {epoch}")


def run_study(study: optuna.Study, objective: Objective, timeout_s: float | None,
              on_trial: Callable[[optuna.Study, FrozenTrial], None]) -> None:
    """Trials until the study holds --trials of them, the timeout passed, or a signal stopped one."""
    started = time.monotonic()
    # in MLflow (run.tracking) the study is a parent run, each trial a nested run named after its folder
    with tracking.open_group(objective.base, f"study_{study.study_name}", lambda c: Path(c.run.log_dir).name) as group:
        objective.tracking = group
        while not objective.stop_code:
            if STOP.is_set():   # the signal came between trials (a pruned one, say): start no other
                objective.stop_code = 143 if STOP.signal_name == "SIGTERM" else 130
                log.info("%s: no further trial started", STOP.signal_name)
                return
            optuna.storages.fail_stale_trials(study)   # a killed process's trial: FAIL, and queued again
            trials = study.get_trials(deepcopy=False)
            queued = any(t.state == TrialState.WAITING for t in trials)   # retries and enqueued trials always run
            if len(counted(trials)) >= objective.num_trials and not queued:
                running = sum(t.state == TrialState.RUNNING for t in trials)
                log.info("study %r holds its %d trials%s", study.study_name, objective.num_trials,
                         f" ({running} still running elsewhere; a stopped process's trial is failed and queued again "
                         "after 2 heartbeats without news)" if running else "")
                return
            if timeout_s is not None and time.monotonic() - started >= timeout_s:
                log.info("--timeout %g s reached: no further trial started", timeout_s)
                return
            study.optimize(objective, n_trials=1, catch=(TrialFailed,), callbacks=[on_trial])
