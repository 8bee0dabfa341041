"""A bar file read chunk by chunk and cut down to the columns kept: CSV, gzip CSV or Parquet.

Memory: a CSV is parsed CSV_CHUNK_ROWS rows at a time and each chunk is cut down at once to what is kept
(float64 numbers, parsed timestamps, symbol codes), so the text of one chunk is the only text alive; a Parquet
file is read with only the columns used. The checks see the whole file as before: what they need of earlier
chunks (counts, the first bad row) is kept, and every error names the row's position in the file (`RowLocator`).
A file that cannot be opened, decoded or parsed stops the run with one UserError naming the key that changes it
(data.encoding, data.skip_rows).
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..config.schema import DataConfig
from ..errors import UserError
from .column_plan import ColumnPlan, plan_columns

try:
    from pandas.tseries.api import guess_datetime_format
except ImportError:   # pandas < 2.2
    from pandas._libs.tslibs.parsing import guess_datetime_format

log = logging.getLogger(__name__)

PARQUET_MAGIC = b"PAR1"
CSV_CHUNK_ROWS = 1 << 15   # CSV rows parsed as text at a time: the only text alive while a file is read
# what pandas passes over when it infers a timestamp format from the first value (tslib.first_non_null)
NOT_A_TIME = ("", "NaT", "nat", "NAT", "nan", "NaN", "NAN", "now", "today")


class RowLocator:
    """Turns a row position of the table into words a user can find in the file."""

    def __init__(self, path: Path, is_csv: bool, skip_rows: int):
        self.path, self.is_csv, self.skip_rows = path, is_csv, skip_rows

    def __call__(self, label) -> str:
        """`label` is the row's index in the table as read (kept through every filter)."""
        position = int(label)
        if self.is_csv:   # 1-based line of the file: skipped lines, then the header, then the data
            return f"data row {position + 1} (line {self.skip_rows + position + 2})"
        return f"row {position + 1}"


def read_table(path: Path, data: DataConfig) -> tuple[Iterator[pd.DataFrame], bool]:
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
        plan = plan_columns([str(c) for c in schema.names], data, "")
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


def _to_number(values: pd.Series) -> pd.Series:
    """Text to float64; empty or non-numeric text becomes NaN (counted by handle_missing)."""
    if pd.api.types.is_numeric_dtype(values):
        return values.astype(np.float64)
    text = values.astype(str).str.strip()   # '1,5' stays non-numeric (an error), never silently 15
    return pd.to_numeric(text, errors="coerce").astype(np.float64)


class BarTable:
    """The file cut down chunk by chunk to the columns kept (float64 numbers, parsed timestamps, symbol codes),
    with what the whole-file checks need of the rows already read; `finish` runs those checks in their order."""

    def __init__(self, data: DataConfig, name: str):
        self.data, self.name = data, name
        self.header: list[str] | None = None
        self.plan: ColumnPlan | None = None
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
                self.plan = plan_columns(self.header, self.data, self.name)
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

    def finish(self, where: RowLocator) -> pd.DataFrame:
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

    def check(self, where: RowLocator) -> None:
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
