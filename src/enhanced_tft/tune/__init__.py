"""`etft tune`: an Optuna study over training runs (study.py: the space, the objective with its walk-forward folds,
the storage), run end to end (runner.py), the seed noise of the base config (noise.py), local worker processes on
one study (workers.py), the files it leaves (outputs.py), and the search space shipped with the package (space.yaml).

May import: errors, config, runs, runtime, data, report, tracking, training.
"""
