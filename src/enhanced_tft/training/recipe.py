"""A training run end to end, as `etft train` runs it: run folder, data, auto-batch, members, summary, the
test split's outputs (interpretation, predictions_test.csv), report.html; resume; walk-forward folds.

The command line parses and calls these; so can a notebook.
"""
from __future__ import annotations

import logging
import shutil
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from .. import tasks
from ..config import schema as config_mod
from ..config.schema import Config
from ..data import fingerprint as fp
from ..data.fingerprint import data_fingerprint
from ..data.pipeline import build_data
from ..data.transform import Transform
from ..errors import StorageError, TrainingInterrupted, UserError
from ..evaluation.interpret import interpretation_frames, total
from ..evaluation.scorecard import scorecard_table
from ..evaluation.walk_forward import fold_record, format_walk_forward, walk_forward_summary
from ..model.build import dims_for
from ..report.page import write_report
from ..report.plots import to_png, walk_forward_figure
from ..runs import (ATTENTION_CSV, BACKTEST_CSV, CONFIG_YAML, DATA_JSON, IMPORTANCE_BY_SYMBOL_CSV, IMPORTANCE_CSV,
                    SCALER_JSON, RunFolder, atomic_path, restart_marker_file, shared_data_folder, walk_forward_file,
                    write_json_atomic, write_text_atomic)
from ..runtime.precision import resolve_device, resolve_precision
from ..serving.predict import write_test_predictions
from ..serving.saved_run import transform_differences
from ..tracking import tracker as tracking
from .auto_batch import auto_batch
from .checkpoint import verify_resumable
from .distributed import SINGLE, RankFilter, build_shared_data, close_world, init_world, restart_count, run_id
from .ensemble import train_ensemble

log = logging.getLogger("enhanced_tft.train")


@dataclass
class TrainRequest:
    """What `etft train` was asked beyond the config: a folder to continue, and the auto-batch budget."""
    resume_folder: Path | None = None
    changed: tuple[str, ...] = ()      # config keys a resume changed (all in SAFE_RESUME_CHANGES)
    auto_batch: bool = False
    gpu_memory: str | None = None      # auto-batch budget, e.g. 24GiB; None = the device's memory
    restartable: bool = True           # record the folder for a torchrun restart (not for folds spread over ranks)
    allow_changed_data: bool = False   # resume although the data's fingerprint changed (its scaling must match)
    epoch_hook: Callable[[dict], None] | None = None   # called with each epoch's record (etft tune reports val loss)
    bars: object | None = None         # data.source=frame: the checked bars (sources.load_frame_bars) of a DataFrame
    tracked: bool = True               # False on ranks other than 0 training a fold alone (distribute=members)


def resume_request(folder: str | Path, overrides: list[str]) -> tuple[Config, TrainRequest]:
    """A stopped run's own config, with only the changes that keep its training what it was."""
    run = RunFolder(folder)
    if not run.is_run_folder():
        raise UserError(f"--resume {str(run.path)!r} is not a run folder: it needs {CONFIG_YAML} and checkpoints/ "
                        "(a folder like logs/training_20261128_101500)")
    cfg, changed = config_mod.resume_config(config_mod.load_run_config(run.file(CONFIG_YAML)), overrides)
    return cfg, TrainRequest(resume_folder=run.path, changed=tuple(changed))


def train(cfg: Config, request: TrainRequest | None = None) -> int:
    """Train `cfg` (every walk-forward fold when it asks for folds); return the exit code.

    Under torchrun every rank calls this with the same arguments: they train each model together
    (training/distributed.py) and rank 0 writes the one run folder.
    """
    request = request or TrainRequest()
    tracking.require(cfg.run.tracking)   # a missing library answers before any data or training

    world = init_world(resolve_device(cfg.train.device).type)
    # ranks other than 0 print their warnings only, prefixed with the rank; rank 0 tells the rest
    handlers = logging.getLogger("enhanced_tft").handlers if not world.is_main else []
    rank_filter = RankFilter(world.rank)
    for handler in handlers:   # on the handlers: a logger's own filter misses its children's records
        handler.addFilter(rank_filter)
    try:
        if request.resume_folder is None:
            restarted = _resume_after_restart(cfg, request, world)
            if restarted is not request:   # continue what the first attempt trained, with its own config
                cfg = config_mod.load_run_config(RunFolder(restarted.resume_folder).file(CONFIG_YAML))
            request = restarted
        with world.peer_loss():
            if request.resume_folder is None and cfg.data.walk_forward_folds and cfg.data.fold is None:
                # folds: nested runs
                with tracking.open_group(cfg, "walk_forward", tracking.fold_name, world.is_main) as group:
                    code = group.ended(walk_forward(cfg, request, world, group))
            else:
                code = train_run(cfg, request, world)[0]
        marker = restart_marker(cfg.run.log_dir)
        if code == 0 and world.is_main and marker is not None:
            marker.unlink(missing_ok=True)   # finished: no restart will look for it
        return code
    finally:
        for handler in handlers:
            handler.removeFilter(rank_filter)
        close_world(world)


def _resume_after_restart(cfg: Config, request: TrainRequest, world) -> TrainRequest:
    """Under `torchrun --max-restarts K`, a restarted worker group continues the run folder the first attempt
    made (found through LOG_DIR/.torchrun_<run id>, which rank 0 wrote) instead of starting a new one."""
    marker = restart_marker(cfg.run.log_dir)
    if restart_count() == 0 or marker is None:
        return request
    folder = None
    if world.is_main and marker.is_file():
        recorded = marker.read_text().strip()
        folder = recorded if recorded and RunFolder(recorded).is_run_folder() else None
    folder = world.broadcast(folder)
    if folder is None:
        return request   # the first attempt stopped before its folder held a run: start one
    log.warning("torchrun restarted the workers (restart %d of job %s): resuming %s", restart_count(), run_id(),
                folder)
    return resume_request(folder, [])[1]   # the folder's own config: what the first attempt trained


def restart_marker(log_dir: str | Path) -> Path | None:
    """Where a torchrun job records its run folder, for restarts; None outside torchrun's elastic agent."""
    job = run_id()
    return restart_marker_file(log_dir, job) if job else None


def walk_forward(cfg: Config, request: TrainRequest, world, group: tracking.Group | None = None) -> int:
    """One run folder per fold, then the folds' test metrics side by side (and walk_forward_<time>.json).

    Under torchrun the ranks train each fold together, or with train.distribute=members rank r trains folds
    r, r+N, ... alone; rank 0 writes the comparison."""
    folds = cfg.data.walk_forward_folds
    spread = cfg.train.distribute == "members" and world.distributed
    mine = range(world.rank, folds, world.size) if spread else range(folds)
    results, code = [], 0
    for fold in mine:
        log.info("walk-forward fold %d of %d", fold, folds)
        # a fold is not resumed after a torchrun restart: the restart would train the last fold in its folder
        code, run_path = train_run(config_mod.update(cfg, data={"fold": fold}),
                                   replace(request, restartable=False, tracked=world.is_main),
                                   SINGLE if spread else world, group)
        if code != 0:
            break
        if world.is_main or spread:
            results.append(fold_record(fold, run_path))
    if spread:
        codes = world.gather(code)
        code = next((c for c in codes if c != 0), 0)
        results = sorted(sum(world.gather(results), []), key=lambda r: r["fold"])
    if code != 0 or not world.is_main:
        return code
    out = walk_forward_file(cfg.run.log_dir, Path(results[0]["run"]))
    summary = walk_forward_summary(results)
    write_json_atomic(out, summary)
    lines = [format_walk_forward(summary)]
    plot = out.with_suffix(".png")
    with atomic_path(plot) as tmp:
        tmp.write_bytes(to_png(walk_forward_figure(summary)))
    lines.append(f"written to {out} and {plot.name}")
    tracking.log_walk_forward(group, summary, out)
    log.info("\n".join(lines))
    return 0


def _open_run_folder(cfg: Config, request: TrainRequest, world, held: ExitStack) -> RunFolder:
    """The run's folder: rank 0 makes it (or reopens the one to resume), takes its lock into `held`, and tells
    the other ranks."""
    def open_folder() -> str:
        path = request.resume_folder or RunFolder.create(cfg.run.log_dir).path
        held.enter_context(RunFolder(path).lock())   # one trainer per folder: a second --resume is refused
        marker = restart_marker(cfg.run.log_dir)
        if marker is not None and request.resume_folder is None and request.restartable:
            write_text_atomic(marker, f"{path}\n")
        return str(path)

    return RunFolder(world.on_main(open_folder))


def _shared_data_folder(cfg: Config, run: RunFolder) -> Path:
    """Where the ranks of one machine meet their shared arrays: data.memory_map_dir if set, else the system's
    temporary folder (the OS page cache holds one copy of the mapped pages for every rank)."""
    import tempfile
    return shared_data_folder(cfg.data.memory_map_dir or tempfile.gettempdir(), run.path.name, cfg.data.fold)


def train_run(cfg: Config, request: TrainRequest, world=None, group: tracking.Group | None = None) -> tuple[int, Path]:
    """Train one run (or continue `request.resume_folder`) in tracking `group`; return the exit code and run folder."""
    world = world or SINGLE
    resuming = request.resume_folder is not None
    task = tasks.for_config(cfg)
    # heavy imports (torch, pandas) only once the config is known to be good: bad input answers at once
    import torch
    from tqdm.contrib.logging import logging_redirect_tqdm


    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and world.distributed:
        device = torch.device("cuda", world.local_rank)
    policy = resolve_precision(cfg.train.mixed_precision, device)
    # the saved config is what ran: record the effective device and precision
    cfg = config_mod.update(cfg, train={"device": device.type, "mixed_precision": policy.name})
    held = ExitStack()
    run = _open_run_folder(cfg, request, world, held)
    if world.is_main:
        run.attach_logging()
    elif cfg.train.distribute == "members":   # this rank's own members: their lines too, prefixed with the rank
        run.attach_logging(RankFilter(world.rank, min_level=logging.DEBUG))
    started = time.time()
    training_started = False
    try:
        if resuming:
            log.info("resuming run folder %s%s", run.path,
                     f" with changed {', '.join(request.changed)}" if request.changed else "")
        else:
            log.info("run folder %s%s", run.path, "  (test mode)" if cfg.run.test_mode else "")
        if world.distributed and cfg.train.distribute == "members":
            log.info("%d ranks (%s): each trains its own members alone", world.size,
                     "NCCL" if device.type == "cuda" else "gloo")
        elif world.distributed:
            log.info("data-parallel training on %d ranks (%s); each takes its share of every window and split",
                     world.size, "NCCL" if device.type == "cuda" else "gloo")
        if resuming:
            _check_data_unchanged(cfg, run, request, world)
        if world.distributed:   # one copy of the arrays per machine, mapped by its ranks
            data = build_shared_data(lambda: build_data(cfg, request.bars), world, _shared_data_folder(cfg, run))
        else:
            data = build_data(cfg, request.bars)
        if resuming:   # before anything in the folder is rewritten
            _check_resumable(cfg, task, data, run, world)
        fingerprint = None if resuming else _fingerprint(cfg, world, request.bars)   # after the data: bad data says why
        if request.auto_batch:   # sized from the built data: the model's input sizes are the data's
            sharing = world.size if cfg.train.distribute == "data" else 1   # members: each rank a whole model
            cfg, note = auto_batch(cfg, data.transform, device, request.gpu_memory, sharing)
            log.info(note)
        if world.is_main:
            run.write_text(CONFIG_YAML, f"# resolved config of this run; precision {policy.name}: {policy.reason}\n"
                           + config_mod.to_yaml(cfg))
        log.info("task %s; effective batch %d = micro-batch %d x %d accumulation steps; precision %s: %s",
                 cfg.task, cfg.train.samples_per_step, cfg.train.micro_batch_size,
                 cfg.train.gradient_accumulation_steps, policy.name, policy.reason)
        if world.is_main and not resuming:   # a resume checked that its data gives the saved one
            run.write_json(SCALER_JSON, data.scaler)
            run.write_json(DATA_JSON, fingerprint)
        tracker = held.enter_context(   # closed before the lock
            tracking.open_run(cfg, run, group, resuming, main=request.tracked and world.is_main))
        training_started = True
        # only rank 0 shows progress bars; the redirect would also drop the other ranks' console filter
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger("enhanced_tft")]) if world.is_main else nullcontext()
        with redirect:
            result = train_ensemble(cfg, task, data, device, policy, run, resume=resuming, world=world,
                                    epoch_hook=request.epoch_hook)
        summary = result.summary
        log.info("\n".join([
            scorecard_table(task, summary, f"test metrics ({summary['test']['num_samples']} samples):",
                            summary["baseline"]["rule"], summary.get("strong_baseline", {}).get("test"),
                            summary.get("blend")),
            f"train speed {summary['samples_per_s']:.0f} samples/s, peak memory "
            f"{summary['peak_memory_bytes'] / 2**20:.0f} MiB, {time.time() - started:.0f} s in all",
            f"run folder: {run.path}"]))
        if world.is_main:
            write_test_outputs(run, data, result, cfg.run.report)
        tracker.finish(result.summary)   # after the test outputs: the folder's files go too
        return 0, run.path
    except StorageError as err:
        if not training_started:
            raise
        raise err.with_advice(f"; the run's last checkpoint is intact: etft train --resume {run.path}") from None
    except TrainingInterrupted as stop:
        if world.is_main:
            print(f"etft train: {stop}. Resume with: etft train --resume {run.path}", file=sys.stderr)
        return (143 if stop.signal_name == "SIGTERM" else 130), run.path
    finally:
        run.detach_logging()
        held.close()
        if not training_started and not resuming and world.is_main:
            shutil.rmtree(run.path, ignore_errors=True)   # bad input found before training: leave no empty run
            marker = restart_marker(cfg.run.log_dir)
            if marker is not None and request.restartable:
                marker.unlink(missing_ok=True)


def _fingerprint(cfg: Config, world, bars) -> dict | None:
    """The fingerprint of the data a new run starts with (rank 0 hashes the file; the others need none)."""
    return data_fingerprint(cfg, bars) if world.is_main else None


def _check_data_unchanged(cfg: Config, run: RunFolder, request: TrainRequest, world) -> None:
    """A resume trains on the data the run started with: a changed file is refused with the difference, unless
    --allow-changed-data (then the scaling check after building the data still applies)."""

    def check() -> None:
        saved_file = run.file(DATA_JSON)
        if not saved_file.is_file():
            log.warning("%s has no %s (written by an older version): the data cannot be compared with what the "
                        "run started with; only its scaling is checked", run.path, DATA_JSON)
            return
        fp.check_unchanged(
            run.read_json(DATA_JSON), cfg, request.allow_changed_data,
            lambda changed, was: (f"--resume {str(run.path)!r}: the data changed since the run started ({changed}): "
                                  f"resuming would go on training on other data than {was}. Restore that file, or add "
                                  "--allow-changed-data to go on with the new one (refused anyway if its fitted "
                                  "scaling differs)"),
            "resuming on changed data", request.bars)

    world.on_main(check)


def _check_resumable(cfg: Config, task, data, run: RunFolder, world) -> None:
    """The data gives the scaling the run was trained with, and every checkpoint to load fits the config."""

    def check() -> None:
        saved = Transform.from_dict(run.read_json(SCALER_JSON), str(run.file(SCALER_JSON)))
        saved.check_against(cfg, str(run.file(SCALER_JSON)))
        changed = transform_differences(saved, data.transform)
        if changed:
            raise UserError(f"--resume {str(run.path)!r}: the data no longer gives the scaling the run was trained "
                            f"with ({'; '.join(changed)}); resuming would change the inputs mid-run. Restore the "
                            "data the run started with, or start a new run")
        verify_resumable(cfg, task, dims_for(saved), run)

    world.on_main(check)


def write_test_outputs(run: RunFolder, data, result, report: bool = True) -> None:
    """Interpretation CSVs, predictions_test.csv and (with `report`) report.html, from the members' one test pass
    each. The trained run is already saved, so a failure here is reported and leaves the exit code alone."""
    try:
        frames = interpretation_frames(total([m.weights for m in result.members]), data.transform,
                                       data.splits["test"].sequence_length)
        for name, key in ((IMPORTANCE_CSV, "importance"), (IMPORTANCE_BY_SYMBOL_CSV, "importance_by_symbol"),
                          (ATTENTION_CSV, "attention")):
            run.write_csv(name, frames[key])
        write_test_predictions(run, data.splits["test"], data.transform, [m.prediction for m in result.members],
                               others={"blend": result.blend} if result.blend is not None else None)
        if result.curves is not None:
            run.write_csv(BACKTEST_CSV, result.curves.reset_index())
    except Exception:
        log.exception("interpretation or test predictions failed (the trained run is saved)")
    if not report:
        return
    try:
        write_report(run.path)
    except Exception:
        log.exception("report.html failed (the trained run is saved); etft report --run %s retries", run.path)
