"""Training: one run end to end (recipe.py), the members of an ensemble (ensemble.py), one member's loop with
exact accumulation and out-of-memory back-off (trainer.py), what a checkpoint holds to continue exactly
(resume.py), ranks under torchrun (distributed.py), the memory plan (planner.py, auto_batch.py, plan_report.py),
the optimizer and schedule (optim.py), torch.compile (compile.py) and `etft bench`'s measurements (bench.py).

Named `training`, not `train`: `enhanced_tft.train` is the API's function (`import enhanced_tft as et;
et.train(...)`), and a subpackage of the same name would replace it once imported.

May import: everything below it: errors, tasks, config, runs, runtime, data, model, evaluation, serving, report,
tracking.
"""
