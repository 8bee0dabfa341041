"""run.tracking: each run's config, metrics records and summary also go to MLflow and/or TensorBoard
(tracker.py); how it talks to them (backends.py).

May import: errors, config, runs.
"""
