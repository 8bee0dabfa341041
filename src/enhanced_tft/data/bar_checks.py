"""The checks and policies applied to the bars once the whole file is read, in the order load_file_bars runs them.

Symbols, missing values (data.missing), positive prices, duplicate bars (data.duplicates), the order of the rows,
and gaps (data.fill_gaps: bars missing from the series' own calendar, calendar.py). A problem stops the run with a
UserError naming the count, the first row (`RowLocator`) and the key that changes it; a policy that drops or fills rows
logs what it did with its count.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from ..errors import UserError
from .calendar import infer_calendar
from .column_plan import PRICES
from .reader import RowLocator

log = logging.getLogger(__name__)


def check_symbol_text(frame: pd.DataFrame, name: str, where: RowLocator) -> None:
    """'<NA>' is the text pandas writes for a missing value: refused as a symbol rather than trained on as one."""
    literal = frame["symbol"].eq("<NA>").to_numpy(dtype=bool, na_value=False)
    if literal.any():
        first = int(np.flatnonzero(literal)[0])
        raise UserError(f"{name}: {int(literal.sum())} rows have the symbol '<NA>', the first at "
                         f"{where(frame.index[first])}; '<NA>' is the text pandas writes for a missing value, not a "
                         "symbol: write the row's symbol, or leave the cell empty to make it a missing value "
                         "(data.missing)")


def handle_missing(frame: pd.DataFrame, policy: str, name: str, where: RowLocator) -> pd.DataFrame:
    """Empty, NaN, inf or non-numeric values in any used column: an error with counts, or dropped and logged."""
    bad = pd.DataFrame({c: frame[c].isna() for c in frame.columns})
    for column in frame.columns:
        if pd.api.types.is_float_dtype(frame[column]):
            bad[column] |= ~np.isfinite(frame[column].fillna(0.0).to_numpy())
    bad["symbol"] |= frame["symbol"].isin(["", "nan", "None"])   # an empty cell, as text
    rows = bad.any(axis=1)
    if not rows.any():
        return frame
    counts = ", ".join(f"{c} {int(n)}" for c, n in bad.sum().items() if n)
    first = int(np.flatnonzero(rows.to_numpy())[0])
    if policy == "error":
        raise UserError(
            f"{name}: {int(rows.sum())} of {len(frame)} rows have an empty, NaN, inf or non-numeric value in a used "
            f"column (per column: {counts}), the first at {where(frame.index[first])}; fix the file, or set "
            "data.missing=drop to drop those rows")
    log.warning("dropped %d of %d rows with an empty, NaN, inf or non-numeric value (per column: %s; "
                "data.missing=drop)", int(rows.sum()), len(frame), counts)
    return frame[~rows.to_numpy()]


def check_positive(frame: pd.DataFrame, name: str, where: RowLocator) -> None:
    """Prices (and the adjusted close) must be > 0 and volume >= 0: log returns need them."""
    prices = [c for c in (*PRICES, "adj_close") if c in frame]
    bad = (frame[prices] <= 0).any(axis=1) | (frame["volume"] < 0)
    if not bad.any():
        return
    per_column = {c: int((frame[c] <= 0).sum()) for c in prices}
    per_column["volume"] = int((frame["volume"] < 0).sum())
    counts = ", ".join(f"{c} {n}" for c, n in per_column.items() if n)
    first = int(np.flatnonzero(bad.to_numpy())[0])
    row = frame.iloc[first]
    shown = ", ".join(f"{c}={row[c]:g}" for c in (*prices, "volume"))
    raise UserError(
        f"{name}: {int(bad.sum())} of {len(frame)} rows have a price <= 0 or a negative volume (per column: {counts}), "
        f"the first at {where(frame.index[first])} ({row['symbol']} {row['timestamp']}: {shown}); allowed: "
        "prices > 0 and volume >= 0: fix or remove those rows")


def handle_duplicates(frame: pd.DataFrame, policy: str, name: str, where: RowLocator) -> pd.DataFrame:
    """Two bars of one symbol at one timestamp: an error with the count and first example, or keep the later row."""
    dup = frame.duplicated(["symbol", "timestamp"], keep="last")
    if not dup.any():
        return frame
    first = int(np.flatnonzero(dup.to_numpy())[0])
    row = frame.iloc[first]
    if policy == "error":
        raise UserError(
            f"{name}: {int(dup.sum())} duplicate bars (same symbol and timestamp as a later row), the first "
            f"{row['symbol']} at {row['timestamp']}, {where(frame.index[first])}; remove them, or set "
            "data.duplicates=keep_last to keep the later row of the file")
    log.warning("dropped %d duplicate bars (same symbol and timestamp), kept the later row of each "
                "(data.duplicates=keep_last); the first: %s at %s", int(dup.sum()), row["symbol"], row["timestamp"])
    return frame[~dup.to_numpy()]


def sort_bars(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort by symbol then time, and say so when the file was in another order."""
    steps = frame.groupby("symbol", sort=False)["timestamp"].diff().dropna()
    back, forward = int((steps < pd.Timedelta(0)).sum()), int((steps > pd.Timedelta(0)).sum())
    rank, _ = pd.factorize(frame["symbol"], sort=True)   # alphabetical ranks: no Python string per row
    grouped = bool((rank[1:] >= rank[:-1]).all())
    if back == 0 and grouped:
        return frame
    if back > forward:
        why = "the file was newest first" + (f" ({forward} steps forward in time)" if forward else "")
    elif back:
        why = f"the file was not in time order ({back} steps back in time)"
    else:
        why = "the symbols were not in alphabetical blocks"
    log.info("sorted %d rows: %s", len(frame), why)
    return frame.sort_values(["symbol", "timestamp"], kind="stable")


def count_gaps(frame: pd.DataFrame, fill_limit: int) -> pd.DataFrame:
    """Report bars missing from the series' own calendar (calendar.py: weekends and market holidays are not gaps):
    steps longer than a symbol's usual (median) step on that calendar, within the symbol's own first..last bar.
    Fill those of up to `fill_limit` missing bars with flat bars on the calendar's trading days (open = high = low =
    close = the last close, volume 0, extra columns carried forward)."""
    real_step = frame.groupby("symbol", sort=False)["timestamp"].diff()
    calendar = infer_calendar(frame["timestamp"], frame["symbol"], real_step.median())
    clock = pd.Series(calendar.trading_time(frame["timestamp"].to_numpy()), index=frame.index)
    step = clock.groupby(frame["symbol"], sort=False).diff()
    usual = step.groupby(frame["symbol"], sort=False).transform("median")
    missing = (step / usual).round().fillna(1).astype(np.int64).to_numpy() - 1     # bars missing before each row
    gaps = missing > 0
    if not gaps.any():
        log.info("calendar: %s; no gaps", calendar.describe())
        return frame
    largest = frame.loc[gaps].assign(missing=missing[gaps]).nlargest(3, "missing")
    shown = ", ".join(f"{r.symbol} {r.missing} bars before {r.timestamp}" for r in largest.itertuples())
    fill = gaps & (missing <= fill_limit)
    log.info("calendar: %s; %d gaps (steps longer than the symbol's usual step, %d missing bars in all) in %d "
             "symbol(s); the largest: %s; %s", calendar.describe(), int(gaps.sum()), int(missing[gaps].sum()),
             frame.loc[gaps, "symbol"].nunique(), shown,
             f"filled the {int(fill.sum())} of at most {fill_limit} missing bars with {int(missing[fill].sum())} flat "
             "bars (data.fill_gaps)" if fill_limit else "left as they are (data.fill_gaps=N fills gaps of up to N bars)")
    if not fill.any():
        return frame
    # each filled row i brings missing[i] new bars before it: copies of the row before, stepped forward on the clock
    inserts = np.where(fill, missing, 0)
    source = np.repeat(np.arange(len(frame)), inserts + 1)
    rank = np.arange(len(source)) - np.repeat(np.cumsum(inserts + 1) - (inserts + 1), inserts + 1)  # 0 .. inserts[i]
    is_new = rank < np.repeat(inserts, inserts + 1)
    previous = np.where(is_new, source - 1, source)
    out = frame.iloc[previous].reset_index(drop=True)
    new_rows = np.flatnonzero(is_new)
    new_clock = (clock.to_numpy()[previous[new_rows]]
                 + (rank[new_rows] + 1) * usual.to_numpy()[source[new_rows]])
    out.loc[new_rows, "timestamp"] = calendar.timestamps(new_clock)
    for column in PRICES:
        out.loc[new_rows, column] = out["close"].to_numpy()[new_rows]
    out.loc[new_rows, "volume"] = 0.0
    return out
