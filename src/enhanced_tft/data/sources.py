"""Bars from the user's own OHLCV export: CSV, gzip CSV or Parquet, checked row by row; the public entry points.

`load_file_bars(data)` (and `load_frame_bars(frame, data)` for a DataFrame) returns the long format the pipeline takes (timestamp, symbol, open, high, low,
close, volume), sorted by symbol then time. Every problem a file can have stops the run with a UserError
of one paragraph: what is wrong, where (columns, counts, the first row), and the key that changes it.
Policies (data.duplicates, data.missing) may drop rows instead; what they drop is logged with its count.
`example_config(data)` points data.source=sp500 / nasdaq at the example bars of the `arch` package.

The steps live in their own modules: column_plan (which columns are read, data.columns and data.extra_columns),
reader (the file read chunk by chunk, in bounded memory), bar_checks (the checks and policies on the rows) and
calendar (the trading days inferred from the bars, on which gaps are counted).
"""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..config.schema import DataConfig
from ..errors import UserError
from .bar_checks import check_positive, check_symbol_text, count_gaps, handle_duplicates, handle_missing, sort_bars
from .column_plan import OUTPUT, PRICES
from .reader import BarTable, RowLocator, read_table

log = logging.getLogger(__name__)


def load_file_bars(data: DataConfig) -> pd.DataFrame:
    """Read, map, parse and check `data.path`; see the module docstring."""
    if not data.path:
        raise UserError("data.source=file needs data.path, the CSV, gzip CSV or Parquet file of bars")
    path = Path(data.path).expanduser()
    if not path.is_file():
        raise UserError(f"data file {str(path)!r} does not exist (data.path); allowed: a CSV, gzip CSV (.csv.gz) "
                         "or Parquet file of bars")
    chunks, is_csv = read_table(path, data)
    return _checked_bars(chunks, RowLocator(path, is_csv, data.skip_rows), f"data file {str(path)!r}", data, str(path))


def load_frame_bars(bars: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """A pandas DataFrame of bars (the Python API's `data=`), mapped and checked as a file's rows are; row
    numbers in messages are positions in the frame (a DatetimeIndex or a named index is a column)."""
    if not isinstance(bars, pd.DataFrame):
        raise UserError(f"data must be a pandas DataFrame of bars or the path of a CSV/Parquet file, not "
                        f"{type(bars).__name__}")
    if data.skip_rows:
        raise UserError(f"data.skip_rows={data.skip_rows} applies to CSV files only; set data.skip_rows=0 for a "
                        "DataFrame")
    frame = bars if isinstance(bars.index, pd.RangeIndex) else bars.reset_index()
    return _checked_bars(iter([frame.copy(deep=False)]), RowLocator(None, False, 0), "the DataFrame", data,
                         "the DataFrame")


def _checked_bars(chunks, where: RowLocator, name: str, data: DataConfig, origin: str) -> pd.DataFrame:
    table = BarTable(data, name)
    for chunk in chunks:
        table.add(chunk)
    frame = table.finish(where)
    check_symbol_text(frame, name, where)
    frame = handle_missing(frame, data.missing, name, where)
    if frame.empty:
        raise UserError(f"{name}: no rows left after data.missing=drop; every row had an empty, NaN or inf value")
    check_positive(frame, name, where)
    if "adj_close" in frame:
        factor = frame["adj_close"] / frame["close"]
        frame[list(PRICES)] = frame[list(PRICES)].mul(factor, axis=0)
        frame["volume"] = frame["volume"] / factor   # a 2:1 split doubles the shares traded: same in adjusted units
        log.info("adjusted open/high/low/close by %s / close and volume by its inverse (factor %.4g .. %.4g)",
                 data.adjust_column, float(factor.min()), float(factor.max()))
    frame = handle_duplicates(frame, data.duplicates, name, where)
    frame = sort_bars(frame)
    frame = count_gaps(frame, data.fill_gaps)
    log.info("loaded %d bars of %d symbol(s) from %s: %s", len(frame), frame["symbol"].nunique(), origin,
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
