"""`etft tune`: an Optuna study over training runs (study.py: the space, the objective, the storage), run end to
end (runner.py), the files it leaves (outputs.py), and the search space shipped with the package (space.yaml).

May import: errors, config, runs, report, tracking, training.
"""
