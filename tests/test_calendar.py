"""The series' own calendar (data/calendar.py): weekends and market holidays are not gaps, on files each test writes
and on the real exports in ../shared/data."""
import logging

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA
from enhanced_tft.config.schema import build_config
from enhanced_tft.data.calendar import TradingCalendar, infer_calendar
from enhanced_tft.data.sources import load_file_bars

STOCKS = SHARED_DATA / "us_stocks_daily_5sym_2000_2013_quandl_wiki_pd.csv.gz"
COINBASE = SHARED_DATA / "coinbase_btcusd_1h_2017_2019_raw.csv.gz"
HOLIDAY = "2021-02-15"          # a Monday on which no symbol has a bar


def _bars(stamps, symbol: str, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, len(stamps))))
    return pd.DataFrame({"timestamp": pd.DatetimeIndex(stamps).strftime("%Y-%m-%d %H:%M:%S"), "symbol": symbol,
                         "open": close, "high": close * 1.01, "low": close * 0.99, "close": close, "volume": 500.0})


def _business_days(start="2021-01-04", end="2021-03-31") -> pd.DatetimeIndex:
    return pd.bdate_range(start, end).drop(pd.Timestamp(HOLIDAY))


def _load(tmp_path, frame: pd.DataFrame, **data) -> pd.DataFrame:
    path = tmp_path / "bars.csv"
    frame.to_csv(path, index=False)
    return load_file_bars(build_config({"data": {"source": "file", "path": str(path), **data}}).data)


def _stamps(bars: pd.DataFrame, symbol: str) -> list[str]:
    return [str(t.date()) for t in bars.loc[bars["symbol"] == symbol, "timestamp"]]


def test_weekends_and_a_shared_holiday_are_not_gaps_and_one_missing_weekday_is(tmp_path, caplog):
    days = _business_days()
    frame = pd.concat([_bars(days.drop(pd.Timestamp("2021-03-10")), "AAA"), _bars(days, "BBB", seed=1)])
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        filled = _load(tmp_path, frame, fill_gaps=1)
    assert ("calendar: business days (weekends and 1 market holidays are not gaps: days on which no symbol listed "
            "then has a bar, or at most 5% of them; the longest closure 1 trading day from 2021-02-15); 1 gaps (steps "
            "longer than the symbol's usual step, 1 missing bars in all) in 1 symbol(s); the largest: AAA 1 bars "
            "before 2021-03-11 00:00:00; filled the 1 of at most 1 missing bars with 1 flat bars") in caplog.text
    assert len(filled) == 2 * len(days)
    assert _stamps(filled, "AAA") == _stamps(filled, "BBB") == [str(d.date()) for d in days]  # no weekend, no holiday
    new = filled[filled["volume"] == 0.0]
    assert _stamps(new, "AAA") == ["2021-03-10"]
    before = frame[(frame["symbol"] == "AAA") & (frame["timestamp"] == "2021-03-09 00:00:00")]["close"].iloc[0]
    assert (new[["open", "high", "low", "close"]] == before).all().all()


def test_a_gap_across_a_weekend_and_a_holiday_is_filled_on_the_trading_days_only(tmp_path):
    days = _business_days()
    missing = [pd.Timestamp("2021-02-12"), pd.Timestamp("2021-02-16")]        # the Friday before, the Tuesday after
    frame = pd.concat([_bars(days.drop(missing), "AAA"), _bars(days, "BBB", seed=1)])
    assert len(_load(tmp_path, frame, fill_gaps=1)) == 2 * len(days) - 2     # one gap of 2 bars: over the limit
    filled = _load(tmp_path, frame, fill_gaps=2)
    assert _stamps(filled[filled["volume"] == 0.0], "AAA") == ["2021-02-12", "2021-02-16"]


def test_a_symbol_listed_later_is_not_missing_its_earlier_bars(tmp_path, caplog):
    days = _business_days()
    frame = pd.concat([_bars(days, "AAA"), _bars(days, "BBB", seed=1), _bars(days[days >= "2021-03-01"], "CCC", 2)])
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = _load(tmp_path, frame, fill_gaps=100)
    assert "1 market holidays are not gaps" in caplog.text and "; no gaps" in caplog.text
    assert len(bars) == len(frame) and _stamps(bars, "CCC")[0] == "2021-03-01"


def test_one_symbol_takes_short_runs_of_missing_weekdays_as_holidays_and_a_week_as_a_gap(tmp_path, caplog):
    days = _business_days()
    hole = days[(days >= "2021-03-15") & (days <= "2021-03-19")]            # a whole week: 5 weekdays in a row
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        _load(tmp_path, _bars(days.drop(hole), "AAA"))
    assert ("calendar: business days (weekends and 1 market holidays are not gaps: weekdays without a bar, as one "
            "symbol cannot tell a holiday from a missing bar; the longest closure 1 trading day from 2021-02-15); "
            "1 gaps (steps longer than the symbol's usual step, 5 missing bars in all) in 1 symbol(s)") in caplog.text


def test_hourly_data_around_the_clock_keeps_weekend_gaps(tmp_path, caplog):
    hours = pd.date_range("2021-01-04", "2021-02-28 23:00", freq="h")
    saturday = pd.Timestamp("2021-01-09 12:00")
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        filled = _load(tmp_path, _bars(hours.drop(saturday), "BTC"), fill_gaps=1)
    assert ("calendar: every day (bars on all days of the week); 1 gaps (steps longer than the symbol's usual step, "
            "1 missing bars in all) in 1 symbol(s)") in caplog.text
    assert len(filled) == len(hours) and filled.loc[filled["volume"] == 0.0, "timestamp"].tolist() == [saturday]


def test_hourly_data_with_weekend_breaks_fills_across_the_weekend(tmp_path, caplog):
    hours = pd.date_range("2021-01-04", "2021-02-26 23:00", freq="h")
    hours = hours[hours.day_of_week < 5]                                     # 24 hours a day, Monday to Friday
    missing = pd.DatetimeIndex(["2021-01-08 23:00", "2021-01-11 00:00"])     # the last of Friday, the first of Monday
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        filled = _load(tmp_path, _bars(hours.drop(missing), "EURUSD"), fill_gaps=2)
    assert ("calendar: business days (weekends are not gaps; the hours of a trading day are not inferred: a night "
            "without bars is a gap); 1 gaps (steps longer than the symbol's usual step, 2 missing bars in all)") \
        in caplog.text
    assert filled.loc[filled["volume"] == 0.0, "timestamp"].tolist() == list(missing)


def test_trading_time_round_trips_on_trading_days():
    calendar = TradingCalendar((True,) * 5 + (False,) * 2, (np.datetime64("2021-02-15"),))
    stamps = (pd.bdate_range("1995-01-02", "2030-12-31").drop(pd.Timestamp("2021-02-15"))
              + pd.Timedelta(hours=9, minutes=30)).to_numpy()
    clock = calendar.trading_time(stamps)
    assert (np.diff(clock) == np.timedelta64(1, "D")).all()                  # one trading day per step, weekends out
    np.testing.assert_array_equal(calendar.timestamps(clock), stamps)
    short = pd.Series(pd.date_range("2021-01-04", periods=48, freq="h"))     # two days: too short to see a weekend
    assert infer_calendar(short, pd.Series(["A"] * 48), pd.Timedelta(hours=1)).weekmask == (True,) * 7


def _need(path):
    if not path.is_file():
        pytest.skip(f"real market data {path.name} not found in {SHARED_DATA} (the shared data folder beside the "
                    "project is absent in a fresh clone)")
    return path


def test_the_real_daily_stock_file_has_no_gaps_on_its_own_calendar(caplog):
    # before the calendar: 2,635 gaps (5,498 missing bars), every weekend and holiday of the five symbols
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = load_file_bars(build_config({"data": {"source": "file", "path": str(_need(STOCKS)),
                                                     "adjust_column": "adj_close", "fill_gaps": 5}}).data)
    assert ("calendar: business days (weekends and 123 market holidays are not gaps: days on which no symbol listed "
            "then has a bar, or at most 5% of them; the longest closure 4 trading days from 2001-09-11); no gaps") \
        in caplog.text
    assert len(bars) == 12_154                                               # nothing filled


def test_the_real_hourly_btc_file_keeps_every_day(caplog):
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = load_file_bars(build_config({"data": {
            "source": "file", "path": str(_need(COINBASE)), "skip_rows": 1, "columns": {"volume": "volume_btc"},
            "timestamp_format": "%Y-%m-%d %I-%p", "fill_gaps": 5}}).data)
    assert "calendar: every day (bars on all days of the week); no gaps" in caplog.text and len(bars) == 20_111
