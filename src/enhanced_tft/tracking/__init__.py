"""Tracking: MLflow and TensorBoard sinks."""
