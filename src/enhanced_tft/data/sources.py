"""Bars from the user's own OHLCV export: CSV, gzip CSV or Parquet, checked row by row.

`load_file_bars(data)` returns the long format the pipeline takes (timestamp, symbol, open, high, low,
close, volume), sorted by symbol then time. Every problem a file can have stops the run with a UserError
of one paragraph: what is wrong, where (columns, counts, the first row), and the key that changes it.
Policies (data.duplicates, data.missing) may drop rows instead; what they drop is logged with its count.

Memory: a CSV is parsed CSV_CHUNK_ROWS rows at a time and each chunk is cut down at once to what is kept
(float64 numbers, parsed timestamps, symbol codes), so the text of one chunk is the only text alive; a Parquet
file is read with only the columns used. The checks see the whole file as before: what they need of earlier
chunks (counts, the first bad row) is kept, and every error names the row's position in the file.
Extra columns (data.extra_columns) may not share a name with a computed feature or a bar column: a list that
names one is refused; 'all' leaves such columns out and logs their names.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..config import DataConfig, UserError
from . import features

try:
    from pandas.tseries.api import guess_datetime_format
except ImportError:   # pandas < 2.2
    from pandas._libs.tslibs.parsing import guess_datetime_format

log = logging.getLogger(__name__)

PRICES = ("open", "high", "low", "close")
OUTPUT = ("timestamp", "symbol", *PRICES, "volume")
PARQUET_MAGIC = b"PAR1"
CSV_CHUNK_ROWS = 1 << 15   # CSV rows parsed as text at a time: the only text alive while a file is read
# what pandas passes over when it infers a timestamp format from the first value (tslib.first_non_null)
NOT_A_TIME = ("", "NaT", "nat", "NAT", "nan", "NaN", "NAN", "now", "today")


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
    chunks, is_csv = _read_table(path, data)
    where = _Where(path, is_csv, data.skip_rows)
    name = f"data file {str(path)!r}"
    table = _Table(data, name)
    for chunk in chunks:
        table.add(chunk)
    frame = table.finish(where)
    _check_symbol_text(frame, name, where)
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


def _read_table(path: Path, data: DataConfig) -> tuple[Iterator[pd.DataFrame], bool]:
    """The table as chunks of rows (Parquet: one), text kept as text; any reader error becomes one UserError."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise UserError(f"data file {str(path)!r} could not be opened "
                         f"({type(err).__name__}: {_first_line(err)})") from None
    if head == PARQUET_MAGIC or path.suffix.lower() in (".parquet", ".pq"):
        if data.skip_rows:
            raise UserError(f"data.skip_rows={data.skip_rows} applies to CSV files only; {str(path)!r} is Parquet: "
                             "set data.skip_rows=0")
        return _parquet_chunks(path, data), False
    return _csv_chunks(path, data, "gzip" if head[:2] == b"\x1f\x8b" else None), True


def _parquet_chunks(path: Path, data: DataConfig) -> Iterator[pd.DataFrame]:
    try:
        table = pd.read_parquet(path, columns=_parquet_columns(path, data))
    except Exception as err:   # pyarrow raises ArrowInvalid, OSError, ...: all of them mean 'unreadable'
        raise UserError(f"data file {str(path)!r} could not be read as Parquet ({type(err).__name__}: "
                         f"{_first_line(err)}); allowed: a CSV, gzip CSV (.csv.gz) or Parquet file") from None
    yield table


def _parquet_columns(path: Path, data: DataConfig) -> list[str] | None:
    """The used columns, where the schema names them as the table will; None (read them all) otherwise."""
    if data.extra_columns == "all":
        return None
    try:
        import pyarrow.parquet as pq
        schema, num_rows = pq.read_schema(path), pq.read_metadata(path).num_rows
    except Exception:   # unreadable: pd.read_parquet says why
        return None
    index = [c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)]
    if num_rows == 0 or any(c.startswith("__index_level_") for c in index):
        return None   # an empty file's message lists every column; pandas renames an unnamed saved index
    try:
        plan = _plan([str(c) for c in schema.names], data, "")
    except UserError:
        return None   # the whole table gives the message, with the columns as pandas names them
    return [c for c in dict.fromkeys(plan.columns) if c not in index]   # pandas reads a saved index by itself


def _csv_chunks(path: Path, data: DataConfig, compression: str | None) -> Iterator[pd.DataFrame]:
    try:
        with pd.read_csv(path, skiprows=data.skip_rows, compression=compression, dtype=str, keep_default_na=False,
                         skipinitialspace=True, encoding=data.encoding, chunksize=CSV_CHUNK_ROWS) as reader:
            yield from reader
    except UnicodeError as err:
        detail = (f"{err.reason}: byte 0x{err.object[err.start:err.start + 1].hex()}"
                  if isinstance(err, UnicodeDecodeError) else _first_line(err))
        raise UserError(f"data file {str(path)!r} is not {data.encoding} text, the encoding it was read with "
                         f"(data.encoding={data.encoding!r}; {detail}); exports of Excel and other Windows programs "
                         "are often latin-1 or cp1252: set --set data.encoding=latin-1 (or cp1252)") from None
    except Exception as err:   # ParserError, EmptyDataError, BadGzipFile, ...
        hint = ("" if data.skip_rows else "; if the file has lines of free text before the header, set "
                "data.skip_rows to their number (e.g. --set data.skip_rows=1)")
        raise UserError(f"data file {str(path)!r} could not be read as CSV{' (gzip)' if compression else ''} "
                         f"with data.skip_rows={data.skip_rows} ({type(err).__name__}: {_first_line(err)}); allowed: "
                         f"a CSV, gzip CSV (.csv.gz) or Parquet file with one header line{hint}") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _find(columns: list[str], wanted: str) -> str | None:
    """The file's column called `wanted`: exact first, then ignoring case and surrounding spaces."""
    if wanted in columns:
        return wanted
    matches = [c for c in columns if c.strip().lower() == wanted.strip().lower()]
    return matches[0] if len(matches) == 1 else None


@dataclass
class _Plan:
    """Which of the file's columns are read, and as which of ours."""
    picked: dict[str, str]   # our name -> the file's
    extras: list[str]        # data.extra_columns; with 'all', the columns still in (every value so far a number)

    @property
    def columns(self) -> list[str]:
        return [*self.picked.values(), *self.extras]


def _plan(found: list[str], data: DataConfig, name: str) -> _Plan:
    """Our columns, found among the file's through data.columns; a missing one lists what the file has."""
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
    return _Plan(picked, _extra_columns(found, data, set(picked.values()), name))


def _extra_columns(found: list[str], data: DataConfig, used: set[str], name: str) -> list[str]:
    """data.extra_columns as the file names them; 'all' = every other column (those with a value that is not a
    number are left out as the chunks show them). A name the pipeline gives its own inputs is refused in a list and
    left out by 'all': two inputs of one name would be mixed up in the report and the saved scaler."""
    computed = [*features.observed_feature_names(data.return_lags, data.volatility_windows), *features.KNOWN_FEATURES]
    if data.extra_columns == "all":
        taken = [c for c in found if c not in used and (c in computed or c in OUTPUT or c == "adj_close")]
        if taken:
            log.warning("extra_columns=all: left out column(s) %s, named like a bar column or a computed feature "
                        "(%s); rename them in the file to pass them through", ", ".join(taken), ", ".join(computed))
        return [c for c in found if c not in used and c not in taken]
    missing = [c for c in data.extra_columns if c not in found]
    if missing:
        raise UserError(f"{name} lacks the extra column(s) {', '.join(missing)} named in data.extra_columns; the file "
                         f"has: {', '.join(found)}")
    clash = [c for c in data.extra_columns if c in used or c in OUTPUT]
    if clash:
        raise UserError(f"data.extra_columns names {', '.join(clash)}, already used as a bar column; allowed: other "
                         "numeric columns of the file")
    named = [c for c in data.extra_columns if c in computed]
    if named:
        raise UserError(f"{name}: data.extra_columns names {', '.join(named)}, the name of a feature computed from the "
                         f"bars ({', '.join(computed)}), and two inputs of one name are mixed up in the report: rename "
                         "the column in the file, or drop it from data.extra_columns")
    return list(data.extra_columns)


def _to_number(values: pd.Series) -> pd.Series:
    """Text to float64; empty or non-numeric text becomes NaN (counted by _handle_missing)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    text = values.astype(str).str.strip()   # '1,5' stays non-numeric (an error), never silently 15
    return pd.to_numeric(text, errors="coerce").astype(np.float64)


class _Table:
    """The file cut down chunk by chunk to the columns kept (float64 numbers, parsed timestamps, symbol codes),
    with what the whole-file checks need of the rows already read; `finish` runs those checks in their order."""

    def __init__(self, data: DataConfig, name: str):
        self.data, self.name = data, name
        self.header: list[str] | None = None
        self.plan: _Plan | None = None
        self.plan_error: UserError | None = None
        self.num_rows = 0
        self.rows_of_symbol = 0            # data.symbol's rows, in a file of many symbols
        self.other_symbols: list[str] = []  # the first 20 in sorted order, for the message when none is data.symbol
        self.non_numeric: list[str] = []    # extra_columns=all: left out for a value that is not a number
        self.times = _Timestamps(data.timestamp_format, name)
        self.symbols = _SymbolCodes()
        self.labels: list[pd.Index] = []
        self.number_columns: list[str] = []
        self.numbers = _Growing(np.float64, width=0)
        self.timestamps = _Growing("datetime64[ns]")
        self.codes = _Growing(np.int32)

    def add(self, chunk: pd.DataFrame) -> None:
        if not isinstance(chunk.index, pd.RangeIndex):
            chunk = chunk.reset_index()   # a saved index (e.g. dates) is a column
        chunk.index = pd.RangeIndex(self.num_rows, self.num_rows + len(chunk))   # labels = row positions in the file
        chunk.columns = [str(c) for c in chunk.columns]
        self.num_rows += len(chunk)
        if self.header is None:
            self.header = list(chunk.columns)
            try:
                self.plan = _plan(self.header, self.data, self.name)
            except UserError as err:   # raised after the last chunk: an unreadable line further on is named first
                self.plan_error = err
                return
            self.number_columns = [c for c in self.plan.picked if c not in ("timestamp", "symbol")] + self.plan.extras
            self.numbers = _Growing(np.float64, width=len(self.number_columns))
        if self.plan is None or chunk.empty:   # a file to refuse is still read to its end: a bad line comes first
            return
        data, picked = self.data, self.plan.picked
        extras = {c: _to_number(chunk[c]) for c in self.plan.extras}
        if data.extra_columns == "all":
            for column in [c for c, values in extras.items() if values.isna().any()]:
                del extras[column]
                self.plan.extras.remove(column)
                self.numbers.drop_column(self.number_columns.index(column))
                self.number_columns.remove(column)
                self.non_numeric.append(column)
        if data.symbol and "symbol" in picked:
            text = _symbol_text(chunk[picked["symbol"]])
            keep = (text == data.symbol).to_numpy(dtype=bool, na_value=False)
            self.rows_of_symbol += int(keep.sum())
            if not self.rows_of_symbol:
                self.other_symbols = sorted({*self.other_symbols, *text.dropna().unique()})[:20]
            chunk, extras = chunk[keep], {c: values[keep] for c, values in extras.items()}
        self.labels.append(chunk.index)   # a RangeIndex (no memory) unless data.symbol left rows out
        self.timestamps.append(self.times.parse(chunk[picked["timestamp"]]))
        if "symbol" in picked and not data.symbol:
            self.codes.append(self.symbols.encode(_symbol_text(chunk[picked["symbol"]])))
        self.numbers.append(np.column_stack([extras[c] if c in extras else _to_number(chunk[picked[c]])
                                             for c in self.number_columns]))

    def finish(self, where: _Where) -> pd.DataFrame:
        data, name = self.data, self.name
        if not self.num_rows:
            raise UserError(f"{name} has a header ({', '.join(self.header or [])}) but no rows of bars")
        if self.plan_error is not None:
            raise self.plan_error
        if self.non_numeric:
            log.info("extra_columns=all: left out non-numeric column(s) %s",
                     ", ".join(sorted(self.non_numeric, key=self.header.index)))
        if data.symbol and "symbol" in self.plan.picked:
            if not self.rows_of_symbol:
                raise UserError(f"{name} has no rows of data.symbol={data.symbol!r}; its symbols: "
                                 f"{', '.join(self.other_symbols)}")
            log.info("kept the %d rows of symbol %s (data.symbol) out of %d", self.rows_of_symbol, data.symbol,
                     self.num_rows)
        self.times.check(where)
        index = (pd.RangeIndex(self.timestamps.size) if self.timestamps.size == self.num_rows else
                 pd.Index(np.concatenate([np.asarray(labels) for labels in self.labels])))
        frame = pd.DataFrame(self.numbers.finish(), index=index, columns=self.number_columns, copy=False)
        order = list(dict.fromkeys([*self.plan.picked, *self.plan.extras, "symbol"]))   # the order of the counts
        frame.insert(order.index("timestamp"), "timestamp", self.timestamps.finish())
        frame.insert(order.index("symbol"), "symbol", data.symbol or self.symbols.decode(self.codes.finish()))
        return frame


class _Growing:
    """Rows appended in place: the buffer grows by realloc (ndarray.resize), which moves the pages of a large
    buffer rather than copying them, so the rows kept are not held twice while the file is read."""

    def __init__(self, dtype, width: int | None = None):
        self.array = np.empty((0,) if width is None else (0, width), dtype)
        self.size = 0

    def append(self, rows: np.ndarray) -> None:
        end = self.size + len(rows)
        if end > len(self.array):
            self.array.resize((max(end, 2 * len(self.array)), *self.array.shape[1:]), refcheck=False)
        self.array[self.size:end] = rows
        self.size = end

    def drop_column(self, position: int) -> None:
        self.array = np.delete(self.array[:self.size], position, axis=1)

    def finish(self) -> np.ndarray:
        self.array.resize((self.size, *self.array.shape[1:]), refcheck=False)
        return self.array


class _Timestamps:
    """The timestamp column parsed chunk by chunk as one pd.to_datetime call over the whole column parses it:
    without data.timestamp_format, every chunk uses the format pandas infers from the first timestamp."""

    def __init__(self, fmt: str | None, name: str):
        self.fmt, self.name = fmt, name
        self.inferred: str | None = None
        self.num_values = self.num_bad = 0
        self.first_bad: tuple[object, int] | None = None
        self.error: UserError | None = None

    def parse(self, values: pd.Series) -> np.ndarray:
        """datetime64[ns], naive UTC; NaT where empty or unparseable (counted for `check`)."""
        self.num_values += len(values)
        if self.error is not None:
            return np.full(len(values), np.datetime64("NaT", "ns"))
        is_datetime = pd.api.types.is_datetime64_any_dtype(values)
        stripped = values.astype(str).str.strip()
        text = values if is_datetime else stripped
        fmt = self.fmt or (None if is_datetime else self._inferred(text))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # 'could not infer format': we report bad values ourselves
            try:
                parsed = pd.to_datetime(text, format=fmt, errors="coerce", utc=True)
            except (ValueError, TypeError) as err:
                self.error = UserError(
                    f"{self.name}: data.timestamp_format={self.fmt!r} is not usable ({_first_line(err)}); allowed: "
                    "a strftime format such as '%Y-%m-%d %H:%M:%S' or '%Y-%m-%d %I-%p'")
                return np.full(len(values), np.datetime64("NaT", "ns"))
        empty = values.isna() | stripped.isin(["", "nan", "NaN", "NaT", "None"])
        bad = (parsed.isna() & ~empty).to_numpy()
        if bad.any():
            self.num_bad += int(bad.sum())
            if self.first_bad is None:
                first = int(np.flatnonzero(bad)[0])
                self.first_bad = (values.iloc[first], values.index[first])
        return parsed.dt.tz_convert(None).astype("datetime64[ns]").to_numpy()

    def _inferred(self, text: pd.Series) -> str | None:
        """pandas' guess from the file's first timestamp ('mixed': each value on its own, as pandas falls back to)."""
        if self.inferred is None:
            usable = (text.notna() & ~text.isin(NOT_A_TIME)).to_numpy()
            if usable.any():
                self.inferred = guess_datetime_format(text.iloc[int(np.flatnonzero(usable)[0])]) or "mixed"
        return self.inferred

    def check(self, where: _Where) -> None:
        if self.error is not None:
            raise self.error
        if self.num_bad:
            value, label = self.first_bad
            advice = (f"data.timestamp_format={self.fmt!r} does not match it; fix the format" if self.fmt else
                      "set data.timestamp_format to its strftime format, e.g. --set data.timestamp_format='%Y-%m-%d "
                      "%I-%p' for '2019-10-17 09-AM'")
            raise UserError(f"{self.name}: {self.num_bad} of {self.num_values} timestamps could not be parsed, the "
                             f"first {value!r} at {where(label)}; {advice}")


class _SymbolCodes:
    """Symbols as int32 codes into one list of names, chunk after chunk: 4 bytes a row instead of a string each."""

    def __init__(self):
        self.codes: dict[str, int] = {}

    def encode(self, text: pd.Series) -> np.ndarray:
        local, names = pd.factorize(text)   # a missing symbol: -1, which picks the -1 appended below
        return np.array([self.codes.setdefault(s, len(self.codes)) for s in names] + [-1], np.int32)[local]

    def decode(self, codes: np.ndarray):
        """The symbols as pandas' text array; -1 is missing. (Categorical.astype(str) would pass through objects.)"""
        return pd.Index(list(self.codes)).array.take(codes, allow_fill=True)


def _symbol_text(values: pd.Series) -> pd.Series:
    """Stripped symbol text; a null (None, NaN, pd.NA) stays missing, never the text 'None', 'nan' or '<NA>'."""
    text = values.astype(str).str.strip()
    missing = values.isna().to_numpy()
    return text.mask(missing) if missing.any() else text


def _check_symbol_text(frame: pd.DataFrame, name: str, where: _Where) -> None:
    """'<NA>' is the text pandas writes for a missing value: refused as a symbol rather than trained on as one."""
    literal = frame["symbol"].eq("<NA>").to_numpy(dtype=bool, na_value=False)
    if literal.any():
        first = int(np.flatnonzero(literal)[0])
        raise UserError(f"{name}: {int(literal.sum())} rows have the symbol '<NA>', the first at "
                         f"{where(frame.index[first])}; '<NA>' is the text pandas writes for a missing value, not a "
                         "symbol: write the row's symbol, or leave the cell empty to make it a missing value "
                         "(data.missing)")


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
