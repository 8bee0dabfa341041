"""Tune: Optuna studies over training runs."""
