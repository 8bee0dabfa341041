"""A saved run -> predictions per symbol and timestamp, streamed to disk batch by batch.

Each batch goes through every member, is turned into columns (ensemble mean, members' spread, each
member) and written at once (Parquet row group or CSV append): memory stays that of one batch
whatever the number of rows. Metrics, when asked for, keep only the predictions themselves.

Legend: B batch, M members, O head outputs (1, 3 quantiles or 3 classes).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data.windows import WindowSet
from .model.heads import QUANTILES
from .train.precision import PrecisionPolicy

log = logging.getLogger(__name__)

MULTICLASS_NAMES = ("down", "flat", "up")


def output_names(task: str) -> list[str]:
    """Column names of one prediction, in the head's output order."""
    if task == "classification_binary":
        return ["p_up"]
    if task == "classification_multiclass":
        return [f"p_{name}" for name in MULTICLASS_NAMES]
    if task == "regression":
        return ["value"]
    return [f"p{round(q * 100)}" for q in QUANTILES]


def prediction_columns(task: str, member_predictions_MB: list[torch.Tensor], target_std: float,
                       with_members: bool = True) -> dict[str, np.ndarray]:
    """Columns of one batch: ensemble mean per output, its spread over members (std), the class, each member.

    Probabilities stay probabilities; regression and quantile values are forward log returns (the model's
    outputs times the train std of the target).
    """
    stacked_MBO = torch.stack(member_predictions_MB).float()
    if stacked_MBO.dim() == 2:
        stacked_MBO = stacked_MBO.unsqueeze(-1)
    mean_BO = stacked_MBO.mean(dim=0)
    spread_BO = stacked_MBO.std(dim=0, unbiased=False)   # 0 for a single member
    scale = target_std if task in ("regression", "quantile") else 1.0
    names = output_names(task)
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(names):
        columns[name] = (mean_BO[:, j] * scale).numpy()
    if task == "classification_binary":
        columns["class"] = (mean_BO[:, 0] > 0.5).to(torch.int8).numpy()
    elif task == "classification_multiclass":
        columns["class"] = mean_BO.argmax(dim=1).to(torch.int8).numpy()
    for j, name in enumerate(names):
        columns[f"{name}_spread"] = (spread_BO[:, j] * scale).numpy()
    if with_members and len(member_predictions_MB) > 1:
        for m in range(stacked_MBO.shape[0]):
            for j, name in enumerate(names):
                columns[f"member_{m}_{name}"] = (stacked_MBO[m, :, j] * scale).numpy()
    return columns


class TableWriter:
    """Appends column batches to a Parquet file (one row group per batch) or a CSV file (header once)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        suffix = "".join(self.path.suffixes[-2:]) if self.path.suffix == ".gz" else self.path.suffix
        if suffix not in (".parquet", ".csv", ".csv.gz"):
            raise ValueError(f"--out {str(path)!r}: allowed endings .parquet, .csv, .csv.gz")
        self.parquet = suffix == ".parquet"
        self._writer = None
        self._handle = None
        self.rows = 0

    def write(self, columns: dict[str, np.ndarray]) -> None:
        import pandas as pd

        frame = pd.DataFrame(columns)
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if self._writer is None:
                self._writer = pq.ParquetWriter(self.path, table.schema)
            self._writer.write_table(table)
        else:
            frame.to_csv(self.path, mode="w" if self.rows == 0 else "a", header=self.rows == 0, index=False,
                         float_format="%.8g")
        self.rows += len(frame)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


# row_columns(ends) -> columns that name each row (symbol, timestamp) and, when known, its target
RowColumns = Callable[[torch.Tensor], dict[str, np.ndarray]]


@torch.no_grad()
def predict_batches(models: list[torch.nn.Module], split: WindowSet, device: torch.device,
                    policy: PrecisionPolicy, batch_size: int):
    """Yield (sample_ends (B,), [member prediction (B,) or (B, O)] on the CPU) batch by batch, in split order.

    Same chunking and precision as the trainer's evaluation, so the numbers are the same to the bit.
    """
    indices = split.all_indices()
    for start in range(0, len(split), batch_size):
        chunk = indices[start:start + batch_size]
        batch = split.batch(chunk)
        inputs = [batch[k].to(device, non_blocking=True) for k in ("observed", "known", "symbol")]
        outputs = []
        for model in models:
            with policy.autocast():
                output = model(*inputs).output
            outputs.append(model.head.predict(output).cpu())
        yield split.sample_ends.index_select(0, chunk), outputs


def stream_predictions(models: list[torch.nn.Module], split: WindowSet, task: str, target_std: float,
                       device: torch.device, policy: PrecisionPolicy, batch_size: int, writer: TableWriter,
                       row_columns: RowColumns, keep: bool = False) -> list[torch.Tensor] | None:
    """Write every window's prediction through `writer`; with `keep`, also return each member's predictions."""
    kept: list[list[torch.Tensor]] = [[] for _ in models]
    for ends_B, member_predictions in predict_batches(models, split, device, policy, batch_size):
        writer.write({**row_columns(ends_B), **prediction_columns(task, member_predictions, target_std)})
        if keep:
            for store, prediction in zip(kept, member_predictions):
                store.append(prediction)
    return [torch.cat(store) for store in kept] if keep else None


def write_test_predictions(run_path: Path, cfg, data, device: torch.device, policy: PrecisionPolicy) -> Path:
    """The run's test split through every member's best weights, as predictions_test.csv in the run folder."""
    from .train.ensemble import load_member, model_dims

    split = data.splits["test"]
    models = [load_member(cfg, model_dims(data), run_path / "checkpoints" / f"member_{m}_best.pt", device)
              for m in range(cfg.train.ensemble_size)]
    symbols = np.asarray(data.symbols, dtype=object)

    def row_columns(ends: torch.Tensor) -> dict[str, np.ndarray]:
        arrays = split.arrays
        return {"symbol": symbols[arrays.symbol.index_select(0, ends).numpy()],
                "target": arrays.target.index_select(0, ends).numpy(),
                "forward_return": arrays.raw_return.index_select(0, ends).numpy()}

    path = run_path / "predictions_test.csv"
    writer = TableWriter(path)
    try:
        stream_predictions(models, split, cfg.task, data.target_std, device, policy, 2 * cfg.train.batch_size,
                           writer, row_columns)
    finally:
        writer.close()
    return path
