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
from enhanced_tft.training import trainer as trainer_module

kind, rank, step, micro = os.environ["ETFT_TEST_FAULT"].split(":")
fired = []
original_init = trainer_module.Trainer.__init__


def fault(phase, global_step, index, indices):
    if (phase, global_step, index) != ("train", int(step), int(micro)) or os.environ.get("RANK") != rank or fired:
        return
    fired.append(True)
    if kind == "oom":
        raise torch.OutOfMemoryError("injected by tests/ddp_entry.py")
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)


def init_with_fault(self, *args, **kwargs):
    original_init(self, *args, **{**kwargs, "fault_hook": fault})


trainer_module.Trainer.__init__ = init_with_fault
sys.exit(main(sys.argv[1:]))
