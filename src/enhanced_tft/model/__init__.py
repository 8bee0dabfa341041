"""The TFT: layers, variable selection, stacked causal attention blocks, the read-out head; build and load.

May import: errors, config. The model receives tensors: it never reads files or the training config.
"""
