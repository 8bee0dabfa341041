"""SIGINT and SIGTERM as a request to stop at the next optimizer step with a checkpoint: the flag the trainer
reads (STOP), and the handlers that set it. Only the command line installs them (cli): a library call leaves the
process's signal handling alone."""
from __future__ import annotations

import signal
import threading


class StopFlag:
    """Set by SIGINT/SIGTERM; the trainer checks it between optimizer steps."""

    def __init__(self):
        self._event = threading.Event()
        self.signal_name = ""

    def request(self, signum: int, _frame=None) -> None:
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt   # a second Ctrl-C: stop now, without waiting for the step to end
        self.signal_name = signal.Signals(signum).name
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def clear(self) -> None:
        self._event.clear()
        self.signal_name = ""


STOP = StopFlag()


def install_signal_handlers() -> dict:
    """Route SIGINT and SIGTERM to STOP; returns the previous handlers for restore_signal_handlers."""
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, STOP.request)
    return previous


def restore_signal_handlers(previous: dict) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    STOP.clear()
