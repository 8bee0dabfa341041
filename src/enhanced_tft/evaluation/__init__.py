"""How a run is judged: the scorecard (model, members, mean member, naive and strong baselines, quant metrics)
for training and `etft evaluate` alike, LightGBM beside it (baselines.py), the quant metrics and backtests
(quant.py), walk-forward folds side by side (walk_forward.py), and what the model looks at (interpret.py).

May import: errors, tasks, config, runs, runtime, data, model.
"""
