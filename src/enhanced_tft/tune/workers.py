"""`etft tune --workers N`: N local processes on one study, each an `etft tune` of its own that joins the study in
the RDB storage (Optuna shares the trials; no scheduler here), each with cores // N torch threads. The parent waits
for them, forwards SIGINT/SIGTERM (each worker stops its trial at a checkpoint, as a lone `etft tune` does) and
reports how each ended."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..runtime.signals import STOP
from ..runtime.threads import available_cpus

log = logging.getLogger("enhanced_tft.tune")

POLL_S = 0.2
PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the folder holding enhanced_tft/: workers import this code


@dataclass
class WorkerExit:
    index: int
    pid: int
    threads: int
    exit_code: int


def threads_per_worker(num_workers: int) -> int:
    """The process's CPUs split between the workers, at least one each."""
    return max(1, available_cpus() // num_workers)


def run_workers(command: list[str], num_workers: int) -> tuple[int, list[WorkerExit]]:
    """Start `command` + `--worker I --threads T` N times and wait for all; the exit code (130/143 when a signal
    was forwarded, else the first worker's failure, else 0) and each worker's exit."""
    threads = threads_per_worker(num_workers)
    path = os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(threads))
    processes = []
    try:
        for index in range(num_workers):
            # a session of its own: a Ctrl-C at the terminal reaches the parent only, which forwards it once
            processes.append(subprocess.Popen([*command, "--worker", str(index), "--threads", str(threads)],
                                              env=env, start_new_session=True))
            log.info("worker %d: pid %d, %d torch thread(s)", index, processes[-1].pid, threads)
        forwarded = _wait(processes)
    except BaseException:   # a second Ctrl-C in the parent: the workers stop now too, and are waited for
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                process.send_signal(signal.SIGINT)
        for process in processes:
            process.wait()
        raise
    exits = [WorkerExit(i, p.pid, threads, p.returncode) for i, p in enumerate(processes)]
    for worker in exits:
        log.info("worker %d (pid %d) exited %d", worker.index, worker.pid, worker.exit_code)
    if forwarded:
        return 128 + forwarded, exits
    failed = [w.exit_code for w in exits if w.exit_code != 0]
    return (failed[0] if failed else 0), exits


def _wait(processes: list[subprocess.Popen]) -> int:
    """Wait for every worker; the signal number forwarded to them, 0 if none."""
    forwarded = 0
    while any(p.poll() is None for p in processes):
        if STOP.is_set() and not forwarded:
            forwarded = signal.SIGTERM if STOP.signal_name == "SIGTERM" else signal.SIGINT
            log.info("%s: forwarded to the workers; each stops its trial at a checkpoint", STOP.signal_name)
            for process in processes:
                if process.poll() is None:
                    process.send_signal(forwarded)
        time.sleep(POLL_S)
    return int(forwarded)


def exits_record(exits: list[WorkerExit]) -> list[dict]:
    return [asdict(w) for w in exits]
