"""`etft ARGS` in a process whose second training (the second trial of an `etft tune`) stops at its first
micro-batch until the process is killed: a test kills it mid-trial without racing the trial's end."""
import sys
import time

from enhanced_tft.cli import main
from enhanced_tft.runtime import faults

trainings = []


def hold_the_second(phase, step, index, indices):
    if (phase, step, index) == ("train", 0, 0):
        trainings.append(step)
        if len(trainings) == 2:
            time.sleep(600)   # the test kills the process long before


faults.hook = hold_the_second
sys.exit(main(sys.argv[1:]))
