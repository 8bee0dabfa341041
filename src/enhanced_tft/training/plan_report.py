"""`etft plan` as a table a person reads, and the input dimensions a plan assumes."""
from __future__ import annotations

from ..config.schema import Config
from ..data import features
from ..model.tft import ModelDims

MIB = 2**20
GIB = 2**30


def plan_dims(cfg: Config, num_observed: int | None = None) -> ModelDims:
    """The model's input sizes as the config's data section would produce them (or N observed variables)."""
    data = cfg.data
    extra = data.num_extra_features if data.source == "synthetic" else (
        len(data.extra_columns) if isinstance(data.extra_columns, list) else 0)   # 'all': known only from the file
    # the volatility inputs with their range estimators: bars without a range give three fewer (known from the data)
    volatility = len(features.REALIZED_NAMES) + len(features.RANGE_NAMES) if data.with_volatility_features else 0
    observed = num_observed or len(features.observed_feature_names(data.return_lags, data.volatility_windows)) + extra \
        + volatility
    return ModelDims(observed, len(features.KNOWN_FEATURES), data.num_symbols, data.horizon)


def format_plan(result: dict) -> str:
    lines = [
        f"memory plan for one training step: micro-batch {result['micro_batch']} x "
        f"{result['configured_gradient_accumulation_steps']} accumulation steps (effective batch "
        f"{result['effective_batch_size']}), {result['num_parameters']:,} parameters, "
        f"{result['input_features']} input variables",
        f"  {'precision':<10}{'checkpoint':<11}{'params':>9}{'grads':>9}{'optim':>9}{'activ':>10}{'temps':>9}"
        f"{'peak':>10}   (MiB)",
    ]
    for row in result["options"]:
        mark = " <- configured" if (row["precision"], row["checkpointing"]) == (result["precision"], result["checkpointing"]) else ""
        lines.append(
            f"  {row['precision']:<10}{row['checkpointing']:<11}{row['parameters'] / MIB:>9.1f}"
            f"{row['gradients'] / MIB:>9.1f}{row['optimizer_state'] / MIB:>9.1f}{row['activations'] / MIB:>10.1f}"
            f"{row['temporaries'] / MIB:>9.1f}{row['peak_bytes'] / MIB:>10.1f}{mark}")
    lines.append(f"configured ({result['precision']}, checkpointing {result['checkpointing']}): peak "
                 f"{result['peak_bytes'] / GIB:.3f} GiB of tensors")
    if "budget_bytes" in result:
        margin = result["margin"]
        lines.append(
            f"budget {result['budget_bytes'] / GIB:.1f} GiB, less {margin['cuda_context_bytes'] / MIB:.0f} MiB CUDA "
            f"context and {margin['fragmentation']:.0%} allocator headroom = "
            f"{result['budget']['usable_bytes'] / GIB:.2f} GiB for tensors")
        if result["fits"] and result["num_devices"] > 1:
            lines.append(f"largest micro-batch that fits one device: {result['max_micro_batch']}; on "
                         f"{result['num_devices']} devices, each running its share of the effective batch "
                         f"{result['effective_batch_size']}: micro-batch {result['micro_batch_size']} x "
                         f"{result['gradient_accumulation_steps']} accumulation steps per device "
                         f"(train.micro_batch_size={result['micro_batch_size']}, train.effective_batch_size="
                         f"{result['effective_batch_size']}; torchrun --nproc-per-node {result['num_devices']})")
        elif result["fits"]:
            lines.append(f"largest micro-batch that fits: {result['max_micro_batch']}; to keep the effective batch "
                         f"{result['effective_batch_size']}: train.micro_batch_size={result['micro_batch_size']} x "
                         f"train.gradient_accumulation_steps={result['gradient_accumulation_steps']}")
        else:
            lines.append("does not fit even at micro-batch 1: set train.activation_checkpointing=all, "
                         "train.mixed_precision=bf16, or lower data.sequence_length or model.d_model")
    return "\n".join(lines)
