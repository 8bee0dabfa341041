"""`etft` under torchrun with a fault of the test's choosing on one rank (tests/test_distributed.py).

ETFT_TEST_FAULT="oom:RANK:STEP:MICRO": torch.OutOfMemoryError before that micro-batch on that rank, once.
ETFT_TEST_FAULT="kill:RANK:STEP:MICRO": SIGKILL to that rank there, on the first attempt only (not after a
torchrun restart). The rest of the command line is `etft`'s.
"""
import os
import signal
import sys

import torch

from enhanced_tft.cli import main
from enhanced_tft.runtime import faults

kind, rank, step, micro = os.environ["ETFT_TEST_FAULT"].split(":")
fired = []


def fault(phase, global_step, index, indices):
    if (phase, global_step, index) != ("train", int(step), int(micro)) or os.environ.get("RANK") != rank or fired:
        return
    fired.append(True)
    if kind == "oom":
        raise torch.OutOfMemoryError("injected by tests/ddp_entry.py")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


faults.hook = fault   # this process is the test's own entry point: the hook lives as long as it does
sys.exit(main(sys.argv[1:]))
