"""Evaluation: the scorecard, baselines, quant metrics, walk-forward, interpretation."""
