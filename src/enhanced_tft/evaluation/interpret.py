"""What a trained model looks at: variable importance from its selection weights, attention by lag.

Means over a split are accumulated batch by batch (sums and counts), so memory is that of one batch
whatever the split's size. Members of an ensemble add into the same sums: the CSVs give the mean
over members and samples.

Legend: B batch, T past steps, H horizon steps, L = T + H, S symbols, h heads, K blocks,
F_past = observed + known variables (past selection), F_known known variables (future selection).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from ..model.tft import TFTOutput

log = logging.getLogger(__name__)


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

    @classmethod
    def for_model(cls, model, num_symbols: int, length: int) -> "WeightSums":
        dims = model.dims
        return cls.zeros(num_symbols, dims.num_observed + dims.num_known, dims.num_known, len(model.blocks),
                         model.blocks[0].num_heads, length)

    def add_chunk(self, out: TFTOutput, symbol_B: torch.Tensor) -> None:
        """One chunk's weights (inference.infer with_weights) into the sums."""
        self.past_SF.index_add_(0, symbol_B, out.observed_weights.double().mean(dim=1).cpu())      # (B, F_past)
        self.future_SF.index_add_(0, symbol_B, out.future_weights.double().mean(dim=1).cpu())      # (B, F_known)
        self.count_S.index_add_(0, symbol_B, torch.ones(len(symbol_B), dtype=torch.float64))
        # the head reads the last position only: its attention row says which lags feed the forecast
        self.attention_KhL.add_(torch.stack([w.double().sum(dim=0) for w in out.attention]).cpu())

    def add(self, other: "WeightSums") -> None:
        for name in ("past_SF", "future_SF", "count_S", "attention_KhL"):
            getattr(self, name).add_(getattr(other, name))
        self.passes += other.passes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, state: dict) -> "WeightSums":
        return cls(**state)


def total(sums: list[WeightSums]) -> WeightSums:
    """The members' sums added up (each sample counted once per member)."""
    out = WeightSums(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in asdict(sums[0]).items()})
    for more in sums[1:]:
        out.add(more)
    return out


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


def interpretation_frames(sums: WeightSums, transform, sequence_length: int) -> dict[str, pd.DataFrame]:
    """The run folder's interpretation tables: importance overall and by symbol, attention by lag."""
    overall, by_symbol = importance_frames(sums, transform.features, transform.known_features, transform.symbols)
    top = overall[overall.selection == "past"].head(3)
    log.info("variable importance on the test split (%d member(s)): %s", sums.passes,
             ", ".join(f"{r.variable} {r.importance:.3f}" for r in top.itertuples()))
    return {"importance": overall, "importance_by_symbol": by_symbol,
            "attention": attention_frame(sums, sequence_length)}
