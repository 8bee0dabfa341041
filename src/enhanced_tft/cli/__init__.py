"""`etft` command line: parsing and dispatch, one module per command (each `add_parser(commands)` and
`run(args) -> exit code`; each imports the heavy packages inside `run`, so that `etft --help` and bad flags answer
before torch loads). The work is in the packages below; this package alone sets process-wide state:
the host allocator, torch's threads and the SIGINT/SIGTERM handlers that let training stop at a checkpoint.

Exit codes come from the errors themselves (enhanced_tft.errors): 0 done; 2 bad input (its message, no
traceback); 3 training could not go on (out of memory at one sample, NaN/inf steps in a row); 130 / 143 stopped
by SIGINT / SIGTERM with a checkpoint; 1 an internal error, with its traceback and a line saying what to report
(or, under torchrun, another rank stopped: one line, the failing rank's own log says why).
"""
from __future__ import annotations

import argparse
import sys
import traceback
from contextlib import contextmanager
from typing import Sequence

from ..errors import OutOfMemoryGiveUp, exit_code_of, is_brief
from ..runs import setup_console_logging
from ..runtime.signals import install_signal_handlers, restore_signal_handlers
from ..runtime.threads import tune_host_allocator
from . import bench, evaluate, export, plan, predict, report, train, tune

ISSUES_HINT = ("this is a bug in Enhanced TFT, not in your input: please report it with the command line, the "
               "config and the traceback above")
COMMANDS = {"train": train, "plan": plan, "report": report, "predict": predict, "export": export,
            "evaluate": evaluate, "bench": bench, "tune": tune}
# the commands whose runs save a checkpoint on SIGINT/SIGTERM; torch's threads are sized by each command once its
# input is checked (runtime.threads.configure_threads), so that bad input answers before torch loads
STOPPABLE = ("train", "tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="etft", description="Enhanced TFT for market time series")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS.values():
        module.add_parser(commands)
    return parser


@contextmanager
def _process_state(command: str):
    """Signal handlers for the command, restored when it returns (tests call main() many times)."""
    previous = install_signal_handlers() if command in STOPPABLE else None
    try:
        yield
    finally:
        if previous is not None:
            restore_signal_handlers(previous)


def main(argv: Sequence[str] | None = None) -> int:
    tune_host_allocator()   # reuse freed tensor memory, huge pages for large tensors
    args = build_parser().parse_args(argv)
    setup_console_logging()
    try:
        with _process_state(args.command):
            return COMMANDS[args.command].run(args)
    except (Exception, KeyboardInterrupt) as err:
        if isinstance(err, (RuntimeError, MemoryError)) and not is_brief(err):
            from ..runtime.memory import is_out_of_memory  # torch: loaded by then for any such error
            if is_out_of_memory(err):   # outside a step (moving the model, building data, say): no recovery there
                err = OutOfMemoryGiveUp.outside_a_step(err)
        code = exit_code_of(err)
        if isinstance(err, KeyboardInterrupt):
            print(f"etft {args.command}: interrupted", file=sys.stderr)
        elif is_brief(err):
            print(f"etft {args.command}: error: {err}", file=sys.stderr)
        else:
            traceback.print_exc()
            print(f"etft {args.command}: internal error: {ISSUES_HINT}", file=sys.stderr)
        return code
