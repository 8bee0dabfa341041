"""Which of a bar file's columns are read, and as which of ours: data.columns, data.adjust_column and
data.extra_columns, matched against the file's header.

A missing column stops the run with a UserError that lists the file's columns and how to map them. Extra columns
may not share a name with a computed feature or a bar column: a list that names one is refused; 'all' leaves such
columns out and logs their names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..config.schema import DataConfig
from ..errors import UserError
from . import features

log = logging.getLogger(__name__)

PRICES = ("open", "high", "low", "close")
OUTPUT = ("timestamp", "symbol", *PRICES, "volume")


def _find(columns: list[str], wanted: str) -> str | None:
    """The file's column called `wanted`: exact first, then ignoring case and surrounding spaces."""
    if wanted in columns:
        return wanted
    matches = [c for c in columns if c.strip().lower() == wanted.strip().lower()]
    return matches[0] if len(matches) == 1 else None


@dataclass
class ColumnPlan:
    """Which of the file's columns are read, and as which of ours."""
    picked: dict[str, str]   # our name -> the file's
    extras: list[str]        # data.extra_columns; with 'all', the columns still in (every value so far a number)

    @property
    def columns(self) -> list[str]:
        return [*self.picked.values(), *self.extras]


def plan_columns(found: list[str], data: DataConfig, name: str) -> ColumnPlan:
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
    return ColumnPlan(picked, _extra_columns(found, data, set(picked.values()), name))


def _extra_columns(found: list[str], data: DataConfig, used: set[str], name: str) -> list[str]:
    """data.extra_columns as the file names them; 'all' = every other column (those with a value that is not a
    number are left out as the chunks show them). A name the pipeline gives its own inputs is refused in a list and
    left out by 'all': two inputs of one name would be mixed up in the report and the saved scaler."""
    computed = [*features.observed_feature_names(data.return_lags, data.volatility_windows), *features.KNOWN_FEATURES,
                *((*features.REALIZED_NAMES, *features.RANGE_NAMES) if data.with_volatility_features else ())]
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
