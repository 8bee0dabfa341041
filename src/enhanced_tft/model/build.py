"""Build the model a config describes, and rebuild a trained one from its saved weights.

The model takes plain sizes; the task says how many outputs the head has (tasks.Task.output_size), the
fitted data transform how many inputs (dims_for). Loading a file is the run folder's job (runs.py):
here a state dict (tensors) goes into a freshly built model. A model leaves the CPU through move_to_device,
which also sets the CPU fast paths' switch to that device's stated default (model/layers.py).
"""
from __future__ import annotations

from typing import Any

import torch

from ..config.schema import Config, ModelConfig
from ..errors import WeightsMismatch
from .layers import fast_cpu_kernels_default, set_fast_cpu_kernels
from .tft import EnhancedTFT, ModelDims, set_activation_checkpointing


def dims_for(transform) -> ModelDims:
    """The input sizes a fitted transform implies (observed features, calendar inputs, symbols, horizon)."""
    return ModelDims(len(transform.features), len(transform.known_features), len(transform.symbols),
                     transform.horizon)


def build_training_model(cfg: Config, task, dims: ModelDims, device: torch.device | None = None) -> EnhancedTFT:
    """The model as training runs it: built from the config, its activation-checkpointing policy applied (a
    policy on the built model, from outside it). With a `device`, also moved there with the CPU fast paths
    set to that device's default; without one it stays on the CPU, fast paths on."""
    model = set_activation_checkpointing(build_model(cfg.model, dims, task.output_size),
                                         cfg.train.activation_checkpointing)
    return model if device is None else move_to_device(model, device)


def build_model(model: ModelConfig, dims: ModelDims, output_size: int) -> EnhancedTFT:
    """The model of a config's `model` section for inputs of `dims` and a head of `output_size` outputs."""
    return EnhancedTFT(dims, output_size, model.d_model, model.num_heads, model.num_transformer_blocks,
                       model.ff_dim, model.dropout_rate, model.variable_hidden_size, model.lstm_layers, model.linear_skip)


def move_to_device(model: EnhancedTFT, device: torch.device | str) -> EnhancedTFT:
    """`model` on `device`, with the CPU fast paths on or off as that device's default says."""
    return set_fast_cpu_kernels(model, fast_cpu_kernels_default(device)).to(device)


def load_model(model: ModelConfig, dims: ModelDims, output_size: int, state_dict: dict[str, torch.Tensor],
               device: torch.device) -> EnhancedTFT:
    """A trained model: built from the config, given `state_dict`, moved to `device`, in eval mode."""
    built = build_model(model, dims, output_size)
    problem = weights_problem(state_dict, {k: tuple(v.shape) for k, v in built.state_dict().items()})
    if problem:   # missing or misshapen weights: another model's checkpoint
        raise WeightsMismatch(problem)
    built.load_state_dict(state_dict)
    return move_to_device(built, device).eval()


def weights_problem(weights: Any, expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why saved weights do not fit a model whose weights have the names and shapes `expected` (missing,
    unexpected or misshapen names), or None."""
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        return "its weights are not a mapping of names to tensors"
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    misshapen = [f"{k} {tuple(weights[k].shape)} (the config's model: {expected[k]})" for k in expected
                 if k in weights and tuple(weights[k].shape) != expected[k]]
    parts = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
             for label, names in (("shapes differ", misshapen), ("missing weights", missing),
                                  ("weights the model lacks", unexpected)) if names]
    return "; ".join(parts) or None
