"""A trained run put to use: the one batched inference loop with its out-of-memory back-off (inference.py), a
saved run as prediction reads it (saved_run.py), streamed prediction files and `etft evaluate`'s numbers
(predict.py), the ONNX export (export.py) and torch-free serving by ONNX Runtime (onnx_model.py).

May import: errors, tasks, config, runs, runtime, data, model, evaluation.
"""
