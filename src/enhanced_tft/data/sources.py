"""Bars from the user's own OHLCV export: CSV, gzip CSV or Parquet, checked row by row.

`load_file_bars(data)` returns the long format the pipeline takes (timestamp, symbol, open, high, low,
close, volume), sorted by symbol then time. Every problem a file can have stops the run with a UserError
of one paragraph: what is wrong, where (columns, counts, the first row), and the key that changes it.
Policies (data.duplicates, data.missing) may drop rows instead; what they drop is logged with its count.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import DataConfig, UserError

log = logging.getLogger(__name__)

PRICES = ("open", "high", "low", "close")
OUTPUT = ("timestamp", "symbol", *PRICES, "volume")
PARQUET_MAGIC = b"PAR1"


class _Where:
    """Turns a row position of the table into words a user can find in the file."""

    def __init__(self, path: Path, is_csv: bool, skip_rows: int):
        self.path, self.is_csv, self.skip_rows = path, is_csv, skip_rows

    def __call__(self, label) -> str:
        """`label` is the row's index in the table as read (kept through every filter)."""
        position = int(label)
        if self.is_csv:   # 1-based line of the file: skipped lines, then the header, then the data
            return f"data row {position + 1} (line {self.skip_rows + position + 2})"
        return f"row {position + 1}"


def load_file_bars(data: DataConfig) -> pd.DataFrame:
    """Read, map, parse and check `data.path`; see the module docstring."""
    if not data.path:
        raise UserError("data.source=file needs data.path, the CSV, gzip CSV or Parquet file of bars")
    path = Path(data.path).expanduser()
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist (data.path); allowed: a CSV, gzip CSV (.csv.gz) "
                         "or Parquet file of bars")
    raw, is_csv = _read_table(path, data.skip_rows)
    if not isinstance(raw.index, pd.RangeIndex) or raw.index.start != 0 or raw.index.step != 1:
        raw = raw.reset_index(drop=isinstance(raw.index, pd.RangeIndex))   # a saved index (e.g. dates) is a column
    raw.index = pd.RangeIndex(len(raw))   # row labels = row positions in the file, kept through every filter
    where = _Where(path, is_csv, data.skip_rows)
    name = f"data file {str(path)!r}"
    if raw.empty:
        raise UserError(f"{name} has a header ({', '.join(map(str, raw.columns))}) but no rows of bars")
    frame = _select_columns(raw, data, name)
    frame["timestamp"] = _parse_timestamps(frame["timestamp"], data.timestamp_format, name, where)
    used = [c for c in frame.columns if c not in ("timestamp", "symbol")]
    for column in used:
        frame[column] = _to_number(frame[column])
    frame = _handle_missing(frame, data.missing, name, where)
    if frame.empty:
        raise UserError(f"{name}: no rows left after data.missing=drop; every row had an empty, NaN or inf value")
    _check_positive(frame, name, where)
    if "adj_close" in frame:
        factor = frame["adj_close"] / frame["close"]
        frame[list(PRICES)] = frame[list(PRICES)].mul(factor, axis=0)
        frame["volume"] = frame["volume"] / factor   # a 2:1 split doubles the shares traded: same in adjusted units
        log.info("adjusted open/high/low/close by %s / close and volume by its inverse (factor %.4g .. %.4g)",
                 data.adjust_column, float(factor.min()), float(factor.max()))
    frame = _handle_duplicates(frame, data.duplicates, name, where)
    frame = _sort(frame)
    frame = _gaps(frame, data.fill_gaps)
    log.info("loaded %d bars of %d symbol(s) from %s: %s", len(frame), frame["symbol"].nunique(), path,
             ", ".join(f"{s} {n}" for s, n in frame.groupby("symbol", sort=True).size().items()))
    extras = [c for c in frame.columns if c not in OUTPUT and c != "adj_close"]
    return frame[[*OUTPUT, *extras]].reset_index(drop=True)


def example_config(data: DataConfig) -> DataConfig:
    """data.source=sp500 / nasdaq: the daily index bars (1999-2018, Yahoo Finance export) that the `arch` package
    ships as arch/data/<name>/<name>.csv.gz, read through the same loader and checks as a user's file."""
    import importlib.util

    spec = importlib.util.find_spec("arch")   # locate the package without importing it (and statsmodels)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"data.source={data.source!r} reads the example bars of the `arch` package, which is not "
                         "installed: pip install 'enhanced-tft[examples]' (or pip install arch), or use "
                         "data.source=synthetic or etft train --data PATH")
    path = Path(spec.submodule_search_locations[0]) / "data" / data.source / f"{data.source}.csv.gz"
    if not path.is_file():
        raise UserError(f"the installed `arch` package has no {path.name} (looked in {path.parent}); "
                         "install arch >= 4.0")
    return data.model_copy(update={"source": "file", "path": str(path), "symbol": data.source.upper(),
                                   "columns": {"timestamp": "Date", **data.columns},
                                   "timestamp_format": data.timestamp_format or "%m/%d/%Y"})


def _read_table(path: Path, skip_rows: int) -> tuple[pd.DataFrame, bool]:
    """The whole table with text kept as text; any reader error becomes one UserError with advice."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise UserError(f"data file {str(path)!r} could not be opened "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    if head == PARQUET_MAGIC or path.suffix.lower() in (".parquet", ".pq"):
        if skip_rows:
            raise UserError(f"data.skip_rows={skip_rows} applies to CSV files only; {str(path)!r} is Parquet: "
                             "set data.skip_rows=0")
        try:
            return pd.read_parquet(path), False
        except Exception as err:   # pyarrow raises ArrowInvalid, OSError, ...: all of them mean 'unreadable'
            raise UserError(f"data file {str(path)!r} could not be read as Parquet ({type(err).__name__}: "
                             f"{_first_line(err)}); allowed: a CSV, gzip CSV (.csv.gz) or Parquet file") from None
    compression = "gzip" if head[:2] == b"\x1f\x8b" else None
    try:
        return pd.read_csv(path, skiprows=skip_rows, compression=compression, dtype=str,
                           keep_default_na=False, skipinitialspace=True), True
    except Exception as err:   # ParserError, EmptyDataError, UnicodeDecodeError, BadGzipFile, ...
        hint = ("" if skip_rows else "; if the file has lines of free text before the header, set "
                "data.skip_rows to their number (e.g. --set data.skip_rows=1)")
        raise UserError(f"data file {str(path)!r} could not be read as CSV{' (gzip)' if compression else ''} "
                         f"with data.skip_rows={skip_rows} ({type(err).__name__}: {_first_line(err)}); allowed: a "
                         f"CSV, gzip CSV (.csv.gz) or Parquet file with one header line{hint}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _find(columns: list[str], wanted: str) -> str | None:
    """The file's column called `wanted`: exact first, then ignoring case and surrounding spaces."""
    if wanted in columns:
        return wanted
    matches = [c for c in columns if c.strip().lower() == wanted.strip().lower()]
    return matches[0] if len(matches) == 1 else None


def _select_columns(raw: pd.DataFrame, data: DataConfig, name: str) -> pd.DataFrame:
    """Our columns, renamed from the file's through data.columns; a missing one lists what the file has."""
    found = [str(c) for c in raw.columns]
    raw.columns = found
    wanted = ["timestamp", *(() if data.symbol else ("symbol",)), *PRICES, "volume"]
    if data.symbol and _find(found, data.columns.get("symbol", "symbol")):
        wanted.append("symbol")   # a multi-symbol file: keep only data.symbol's rows below
    if data.adjust_column:
        wanted.append("adj_close")
    picked: dict[str, str] = {}
    missing: list[str] = []
    for ours in wanted:
        theirs = data.columns.get(ours, data.adjust_column if ours == "adj_close" else ours)
        column = _find(found, theirs)
        if column is None and ours == "timestamp" and "timestamp" not in data.columns:
            column = _find(found, "date")
        if column is None:
            missing.append(ours if theirs == ours else f"{ours} (mapped to {theirs!r})")
        else:
            picked[ours] = column
    if missing:
        example = ", ".join(f"{m.split(' ')[0]}: <name in the file>" for m in missing[:2])
        symbol_hint = "; a file of one symbol without a symbol column needs data.symbol" if any(
            m.startswith("symbol") for m in missing) else ""
        if not data.skip_rows and len(picked) < len(missing):
            symbol_hint += ("; if the header is not the first line of the file, set data.skip_rows to the number of "
                            "lines before it (e.g. --set data.skip_rows=1)")
        raise UserError(
            f"{name} lacks column(s) {', '.join(missing)}; the file has {len(found)} column(s): {', '.join(found)}; "
            f"map our names to the file's with data.columns, e.g. --set data.columns='{{{example}}}' (our names: "
            f"timestamp (or date), symbol, open, high, low, close, volume, adj_close){symbol_hint}")
    frame = pd.DataFrame({ours: raw[theirs] for ours, theirs in picked.items()})
    for column in _extra_columns(raw, data, set(picked.values()), name):
        frame[column] = raw[column]
    if data.symbol:
        if "symbol" in frame:
            keep = frame["symbol"].astype(str).str.strip() == data.symbol
            if not keep.any():
                shown = ", ".join(sorted(frame["symbol"].astype(str).str.strip().unique())[:20])
                raise UserError(f"{name} has no rows of data.symbol={data.symbol!r}; its symbols: {shown}")
            log.info("kept the %d rows of symbol %s (data.symbol) out of %d", int(keep.sum()), data.symbol, len(frame))
            frame = frame[keep]
        frame["symbol"] = data.symbol
    else:
        frame["symbol"] = frame["symbol"].astype(str).str.strip()
    return frame


def _extra_columns(raw: pd.DataFrame, data: DataConfig, used: set[str], name: str) -> list[str]:
    """data.extra_columns as the file names them; 'all' = every other column whose values are all numbers."""
    if data.extra_columns == "all":
        extra = [c for c in raw.columns if c not in used and _to_number(raw[c]).notna().all()]
        skipped = [c for c in raw.columns if c not in used and c not in extra]
        if skipped:
            log.info("extra_columns=all: left out non-numeric column(s) %s", ", ".join(skipped))
        return extra
    missing = [c for c in data.extra_columns if c not in raw.columns]
    if missing:
        raise UserError(f"{name} lacks the extra column(s) {', '.join(missing)} named in data.extra_columns; the file "
                         f"has: {', '.join(map(str, raw.columns))}")
    clash = [c for c in data.extra_columns if c in used or c in OUTPUT]
    if clash:
        raise UserError(f"data.extra_columns names {', '.join(clash)}, already used as a bar column; allowed: other "
                         "numeric columns of the file")
    return list(data.extra_columns)


def _to_number(values: pd.Series) -> pd.Series:
    """Text to float64; empty or non-numeric text becomes NaN (counted by _handle_missing)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    text = values.astype(str).str.strip()   # '1,5' stays non-numeric (an error), never silently 15
    return pd.to_numeric(text, errors="coerce").astype(np.float64)


def _parse_timestamps(values: pd.Series, fmt: str | None, name: str, where: _Where) -> pd.Series:
    """Timestamps as naive UTC datetimes; unparseable text is an error naming an example and the format key."""
    text = values.astype(str).str.strip() if not pd.api.types.is_datetime64_any_dtype(values) else values
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # 'could not infer format': we report bad values ourselves
        try:
            parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
        except (ValueError, TypeError) as err:
            raise UserError(f"{name}: data.timestamp_format={fmt!r} is not usable ({_first_line(err)}); allowed: "
                             "a strftime format such as '%Y-%m-%d %H:%M:%S' or '%Y-%m-%d %I-%p'") from None
    empty = values.isna() | (values.astype(str).str.strip().isin(["", "nan", "NaN", "NaT", "None"]))
    bad = parsed.isna() & ~empty
    if bad.any():
        first = int(np.flatnonzero(bad.to_numpy())[0])
        advice = (f"data.timestamp_format={fmt!r} does not match it; fix the format" if fmt else
                  "set data.timestamp_format to its strftime format, e.g. --set data.timestamp_format='%Y-%m-%d "
                  "%I-%p' for '2019-10-17 09-AM'")
        raise UserError(f"{name}: {int(bad.sum())} of {len(values)} timestamps could not be parsed, the first "
                         f"{values.iloc[first]!r} at {where(values.index[first])}; {advice}")
    return parsed.dt.tz_convert(None).astype("datetime64[ns]")


def _handle_missing(frame: pd.DataFrame, policy: str, name: str, where: _Where) -> pd.DataFrame:
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


def _check_positive(frame: pd.DataFrame, name: str, where: _Where) -> None:
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


def _handle_duplicates(frame: pd.DataFrame, policy: str, name: str, where: _Where) -> pd.DataFrame:
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


def _sort(frame: pd.DataFrame) -> pd.DataFrame:
    """Sort by symbol then time, and say so when the file was in another order."""
    steps = frame.groupby("symbol", sort=False)["timestamp"].diff().dropna()
    back, forward = int((steps < pd.Timedelta(0)).sum()), int((steps > pd.Timedelta(0)).sum())
    symbol_order = frame["symbol"].to_numpy()
    grouped = bool((symbol_order[1:] >= symbol_order[:-1]).all()) if len(frame) > 1 else True
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


def _gaps(frame: pd.DataFrame, fill_limit: int) -> pd.DataFrame:
    """Report steps longer than a symbol's usual (median) step; fill those of up to `fill_limit` missing bars
    with flat bars (open = high = low = close = the last close, volume 0, extra columns carried forward)."""
    step = frame.groupby("symbol", sort=False)["timestamp"].diff()
    usual = step.groupby(frame["symbol"], sort=False).transform("median")
    missing = (step / usual).round().fillna(1).astype(np.int64).to_numpy() - 1     # bars missing before each row
    gaps = missing > 0
    if not gaps.any():
        return frame
    largest = frame.loc[gaps].assign(missing=missing[gaps]).nlargest(3, "missing")
    shown = ", ".join(f"{r.symbol} {r.missing} bars before {r.timestamp}" for r in largest.itertuples())
    fill = gaps & (missing <= fill_limit)
    log.info("%d gaps (steps longer than the symbol's usual step, %d missing bars in all); the largest: %s; %s",
             int(gaps.sum()), int(missing[gaps].sum()), shown,
             f"filled the {int(fill.sum())} of at most {fill_limit} missing bars with {int(missing[fill].sum())} flat "
             "bars (data.fill_gaps)" if fill_limit else "left as they are (data.fill_gaps=N fills gaps of up to N bars)")
    if not fill.any():
        return frame
    # each filled row i brings missing[i] new bars before it: copies of the row before, stepped forward in time
    inserts = np.where(fill, missing, 0)
    source = np.repeat(np.arange(len(frame)), inserts + 1)
    rank = np.arange(len(source)) - np.repeat(np.cumsum(inserts + 1) - (inserts + 1), inserts + 1)  # 0 .. inserts[i]
    is_new = rank < np.repeat(inserts, inserts + 1)
    previous = np.where(is_new, source - 1, source)
    out = frame.iloc[previous].reset_index(drop=True)
    new_rows = np.flatnonzero(is_new)
    out.loc[new_rows, "timestamp"] = (out["timestamp"].to_numpy()[new_rows]
                                      + (rank[new_rows] + 1) * usual.to_numpy()[source[new_rows]])
    for column in PRICES:
        out.loc[new_rows, column] = out["close"].to_numpy()[new_rows]
    out.loc[new_rows, "volume"] = 0.0
    return out
