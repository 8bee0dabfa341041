"""The series' own calendar, inferred from the bars of the whole file: the days on which its market trades.

A gap (bar_checks.count_gaps) is a bar missing from this calendar: weekends and market holidays are not gaps. The rules,
pooled over all symbols of the file:
- Weekend: in a file of daily or shorter bars (the usual step, the median over all symbols, at most one day) whose
  dates span at least 4 weeks, a day of the week carrying under 1% of the bars of the busiest day of the week. 24/7
  data (crypto) has none: its calendar is every day, and gaps are found exactly as before the calendar existed.
- Market holiday: a trading day of the week on which at most 5% of the symbols listed that day (each symbol is
  listed from its first to its last bar) have a bar, in a run of at most 4 such days; the NYSE's longest closure
  since 1933 was 4 days (11-14 September 2001). A longer run is a hole in the file: its days are gaps. With one
  symbol, pooling cannot tell a holiday from a missing bar, so each weekday without a bar (in runs of up to 4) is
  taken as a holiday; a symbol with others in the file is held to the days on which the others trade.
- The time of day is not inferred: in intraday bars with session hours (a stock's 9:30-16:00) each night is still a
  step longer than the usual one, so a gap, as before; weekends and holidays are taken out of those steps all the
  same (Friday's close to Monday's open counts as one night).

`trading_time` maps timestamps onto a clock that stands still on closed days (trading days since an epoch plus the
time of day), so that a symbol's steps on that clock are regular and the usual-step arithmetic finds the gaps.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
WEEKEND_SHARE = 0.01        # a day of the week with under 1% of the busiest day's bars is a weekend day
MIN_SPAN_DAYS = 28          # a shorter file cannot show which days of the week are closed
HOLIDAY_SHARE = 0.05        # a day on which at most 5% of the listed symbols have a bar is a market holiday
MAX_HOLIDAY_RUN = 4         # trading days in a row; a longer run without bars is a hole in the file
ONE_DAY = np.timedelta64(1, "D")
EPOCH = np.datetime64("2000-01-03", "D")          # a Monday: day 0 of the trading clock


@dataclass(frozen=True)
class TradingCalendar:
    """Open days of the week (Mon..Sun flags) and the market holidays (dates) of one file."""

    weekmask: tuple[bool, ...] = (True,) * 7
    holidays: tuple[np.datetime64, ...] = ()
    num_symbols: int = 1
    longest_closure: tuple[int, str] = (0, "")     # (trading days in a row, first date) among the holidays
    intraday: bool = False                          # bars shorter than a day: the hours of a day are not inferred

    def _busdaycal(self) -> np.busdaycalendar:
        return np.busdaycalendar(weekmask=list(self.weekmask), holidays=np.array(self.holidays, dtype="datetime64[D]"))

    @property
    def every_day(self) -> bool:
        return all(self.weekmask) and not self.holidays

    def _epoch(self, cal: np.busdaycalendar) -> np.datetime64:
        return np.busday_offset(EPOCH, 0, roll="backward", busdaycal=cal)

    def trading_time(self, timestamps: np.ndarray) -> np.ndarray:
        """Timestamps (datetime64) as trading days since an epoch plus the time of day (timedelta64); a bar on a closed
        day falls at the start of the next trading day's clock."""
        if self.every_day:                    # the same numbers, without a calendar lookup per bar
            return timestamps - EPOCH
        cal = self._busdaycal()
        dates = timestamps.astype("datetime64[D]")
        days = np.busday_count(self._epoch(cal), dates, busdaycal=cal)
        return days.astype("timedelta64[D]") + (timestamps - dates)

    def timestamps(self, trading_time: np.ndarray) -> np.ndarray:
        """The inverse of trading_time for times on trading days."""
        if self.every_day:
            return trading_time + EPOCH
        cal = self._busdaycal()
        days = trading_time // ONE_DAY
        return np.busday_offset(self._epoch(cal), days, busdaycal=cal) + (trading_time - days.astype("timedelta64[D]"))

    def describe(self) -> str:
        """What the log says the calendar is."""
        if all(self.weekmask):
            return "every day (bars on all days of the week)"
        closed = ("weekends" if self.weekmask == (True,) * 5 + (False,) * 2
                  else ", ".join(n for n, is_open in zip(DAY_NAMES, self.weekmask) if not is_open))
        name = ("business days" if closed == "weekends"
                else "trading days " + " ".join(n for n, is_open in zip(DAY_NAMES, self.weekmask) if is_open))
        hours = "; the hours of a trading day are not inferred: a night without bars is a gap" if self.intraday else ""
        if not self.holidays:
            return f"{name} ({closed} are not gaps{hours})"
        how = ("weekdays without a bar, as one symbol cannot tell a holiday from a missing bar" if self.num_symbols == 1
               else "days on which no symbol listed then has a bar, or at most 5% of them")
        run, start = self.longest_closure
        return (f"{name} ({closed} and {len(self.holidays)} market holidays are not gaps: {how}; the longest closure "
                f"{run} trading day{'s' if run > 1 else ''} from {start}{hours})")


def infer_calendar(timestamps: pd.Series, symbols: pd.Series, usual_step: pd.Timedelta) -> TradingCalendar:
    """The calendar of the bars of a file (timestamps and symbols row by row); see the module docstring."""
    dates = timestamps.to_numpy().astype("datetime64[D]")
    num_symbols = int(symbols.nunique())
    first, last = dates.min(), dates.max()
    if pd.isna(usual_step) or usual_step > pd.Timedelta(days=1) or (last - first) < np.timedelta64(MIN_SPAN_DAYS, "D"):
        return TradingCalendar(num_symbols=num_symbols)
    day_of_week = (dates.astype(np.int64) + 3) % 7          # 1970-01-01 was a Thursday; 0 = Monday
    per_day = np.bincount(day_of_week, minlength=7)
    weekmask = tuple(bool(n >= WEEKEND_SHARE * per_day.max()) for n in per_day)
    if all(weekmask):
        return TradingCalendar(num_symbols=num_symbols)
    holidays, longest = _holidays(dates, symbols, weekmask)
    return TradingCalendar(weekmask, holidays, num_symbols, longest, intraday=usual_step < pd.Timedelta(days=1))


def _holidays(dates: np.ndarray, symbols: pd.Series, weekmask: tuple[bool, ...]):
    """Trading days of the week on which (almost) none of the symbols listed that day has a bar, in short runs."""
    first = dates.min()
    days = np.arange(first, dates.max() + 1)                  # every calendar day of the file
    index = (dates - first).astype(np.int64)
    codes, _ = pd.factorize(symbols)
    pairs = np.unique(codes.astype(np.int64) * len(days) + index)       # one per symbol and day with a bar
    with_bar = np.bincount(pairs % len(days), minlength=len(days))
    listed_change = np.zeros(len(days) + 1, dtype=np.int64)
    span = pd.DataFrame({"code": codes, "day": index}).groupby("code")["day"].agg(["min", "max"])
    np.add.at(listed_change, span["min"].to_numpy(), 1)
    np.add.at(listed_change, span["max"].to_numpy() + 1, -1)
    listed = np.cumsum(listed_change)[:-1]
    trading = np.is_busday(days, weekmask=list(weekmask))
    closed = (with_bar <= HOLIDAY_SHARE * listed) & (listed > 0)
    # runs of closed days along the trading days only: a weekend inside a run does not break it
    closed_trading = closed[trading].astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], closed_trading, [0]])))
    starts, ends = edges[::2], edges[1::2]
    keep = ends - starts <= MAX_HOLIDAY_RUN
    trading_days = days[trading]
    holidays = tuple(d for s, e in zip(starts[keep], ends[keep]) for d in trading_days[s:e])
    if not holidays:
        return (), (0, "")
    lengths = (ends - starts)[keep]
    at = int(np.argmax(lengths))
    return holidays, (int(lengths[at]), str(trading_days[starts[keep][at]]))
