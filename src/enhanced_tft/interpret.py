"""What a trained model looks at: variable importance from its selection weights, attention by lag.

Means over a split are accumulated batch by batch (sums and counts), so memory is that of one batch
whatever the split's size. Members of an ensemble add into the same sums: the CSVs give the mean
over members and samples.

Legend: B batch, T past steps, H horizon steps, L = T + H, S symbols, h heads, K blocks,
F_past = observed + known variables (past selection), F_known known variables (future selection).
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from .config import Config
from .data.pipeline import DataBundle
from .data.windows import WindowSet
from .model.tft import EnhancedTFT
from .train.ensemble import load_member, model_dims
from .train.precision import PrecisionPolicy

log = logging.getLogger(__name__)

IMPORTANCE_CSV = "variable_importance.csv"
IMPORTANCE_BY_SYMBOL_CSV = "variable_importance_by_symbol.csv"
ATTENTION_CSV = "attention_by_lag.csv"


@dataclass
class WeightSums:
    """Running sums of per-sample mean selection weights (per symbol) and of the last position's attention."""
    past_SF: torch.Tensor        # (S, F_past) float64: sum over samples of the mean over T of past weights
    future_SF: torch.Tensor      # (S, F_known) float64: same for the H future steps
    count_S: torch.Tensor        # (S,) float64: samples per symbol
    attention_KhL: torch.Tensor  # (K, h, L) float64: sum over samples of the forecast position's attention
    passes: int = 1              # members added in: each sample is counted once per member

    @classmethod
    def zeros(cls, num_symbols: int, num_past: int, num_known: int, num_blocks: int, num_heads: int,
              length: int) -> "WeightSums":
        z = lambda *shape: torch.zeros(shape, dtype=torch.float64)   # noqa: E731
        return cls(z(num_symbols, num_past), z(num_symbols, num_known), z(num_symbols),
                   z(num_blocks, num_heads, length))

    def add(self, other: "WeightSums") -> None:
        for name in ("past_SF", "future_SF", "count_S", "attention_KhL"):
            getattr(self, name).add_(getattr(other, name))
        self.passes += other.passes


@torch.no_grad()
def accumulate_weights(model: EnhancedTFT, split: WindowSet, num_symbols: int, device: torch.device,
                       policy: PrecisionPolicy, batch_size: int) -> WeightSums:
    """One pass over `split` with weights returned; a batch that runs out of memory is redone at half size."""
    model.eval()
    blocks = len(model.blocks)
    heads = model.blocks[0].num_heads
    length = split.sequence_length + split.horizon
    sums = WeightSums.zeros(num_symbols, model.dims.num_observed + model.dims.num_known, model.dims.num_known,
                            blocks, heads, length)
    indices = split.all_indices()
    position = 0
    while position < len(split):
        chunk = indices[position:position + batch_size]
        try:
            batch = split.batch(chunk)
            symbol_B = batch["symbol"]
            with policy.autocast():
                out = model(batch["observed"].to(device), batch["known"].to(device), symbol_B.to(device),
                            return_weights=True)
            past_BF = out.observed_weights.double().mean(dim=1).cpu()                  # (B, F_past)
            future_BF = out.future_weights.double().mean(dim=1).cpu()                  # (B, F_known)
            # the head reads the last position only: its attention row says which lags feed the forecast
            last_KhL = torch.stack([w[:, :, -1, :].double().sum(dim=0) for w in out.attention]).cpu()
        except torch.OutOfMemoryError:
            pass   # leave the except block first so that the traceback's tensors are freed
        else:
            sums.past_SF.index_add_(0, symbol_B, past_BF)
            sums.future_SF.index_add_(0, symbol_B, future_BF)
            sums.count_S.index_add_(0, symbol_B, torch.ones(len(symbol_B), dtype=torch.float64))
            sums.attention_KhL.add_(last_KhL)
            position += chunk.numel()
            continue
        out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if batch_size <= 1:
            raise torch.OutOfMemoryError("out of memory computing attention weights for one sample")
        batch_size //= 2
        log.warning("out of memory computing selection and attention weights: batch -> %d", batch_size)
    return sums


def importance_frames(sums: WeightSums, observed_names: list[str], known_names: list[str],
                      symbols: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(overall, by symbol) variable importance: mean selection weight of each variable, past and future."""
    past_names = [*observed_names, *known_names]
    kinds = ["observed"] * len(observed_names) + ["known"] * len(known_names)
    total = float(sums.count_S.sum())
    rows, symbol_rows = [], []
    for selection, names, kind_list, sum_SF in (("past", past_names, kinds, sums.past_SF),
                                               ("future", list(known_names), ["known"] * len(known_names),
                                                sums.future_SF)):
        overall_F = sum_SF.sum(dim=0) / max(total, 1.0)
        order = torch.argsort(overall_F, descending=True).tolist()
        for rank, j in enumerate(order, start=1):
            rows.append({"selection": selection, "variable": names[j], "kind": kind_list[j],
                         "importance": float(overall_F[j]), "rank": rank})
        for s, symbol in enumerate(symbols):
            count = float(sums.count_S[s])
            if count == 0:
                continue
            for j in order:
                symbol_rows.append({"symbol": symbol, "selection": selection, "variable": names[j],
                                    "importance": float(sum_SF[s, j] / count),
                                    "num_samples": int(count) // sums.passes})
    return pd.DataFrame(rows), pd.DataFrame(symbol_rows)


def attention_frame(sums: WeightSums, sequence_length: int) -> pd.DataFrame:
    """Mean attention of the forecast position over key positions, per block, by lag.

    lag = bars before the last observed bar: 0 is that bar, -1..-H are the known-future rows of the
    horizon (the last of them is the forecast position itself).
    """
    total = max(float(sums.count_S.sum()), 1.0)
    mean_KhL = sums.attention_KhL / total
    blocks, heads, length = mean_KhL.shape
    rows = []
    for k in range(blocks):
        for position in range(length):
            row = {"block": k, "lag": sequence_length - 1 - position, "position": position,
                   "attention": float(mean_KhL[k, :, position].mean())}
            row.update({f"head_{h}": float(mean_KhL[k, h, position]) for h in range(heads)})
            rows.append(row)
    return pd.DataFrame(rows)


def write_interpretation(run_path: Path, cfg: Config, data: DataBundle, device: torch.device,
                         policy: PrecisionPolicy, split_name: str = "test") -> dict[str, Path]:
    """Variable importance (overall, per symbol) and attention by lag of every member, as CSV in the run folder."""
    split = data.splits[split_name]
    total: WeightSums | None = None
    for member in range(cfg.train.ensemble_size):
        model = load_member(cfg, model_dims(data), run_path / "checkpoints" / f"member_{member}_best.pt", device)
        sums = accumulate_weights(model, split, len(data.symbols), device, policy, 2 * cfg.train.batch_size)
        del model
        if total is None:
            total = sums
        else:
            total.add(sums)
    overall, by_symbol = importance_frames(total, data.observed_names, data.known_names, data.symbols)
    attention = attention_frame(total, split.sequence_length)
    paths = {"importance": run_path / IMPORTANCE_CSV, "importance_by_symbol": run_path / IMPORTANCE_BY_SYMBOL_CSV,
             "attention": run_path / ATTENTION_CSV}
    overall.to_csv(paths["importance"], index=False, float_format="%.6g")
    by_symbol.to_csv(paths["importance_by_symbol"], index=False, float_format="%.6g")
    attention.to_csv(paths["attention"], index=False, float_format="%.6g")
    top = overall[overall.selection == "past"].head(3)
    log.info("variable importance on the %s split (%d member(s)): %s", split_name, cfg.train.ensemble_size,
             ", ".join(f"{r.variable} {r.importance:.3f}" for r in top.itertuples()))
    return paths
