"""Serving: the inference loop, predictions, ONNX export, torch-free serving."""
