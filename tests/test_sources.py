"""Bars from users' own files: the real exports in ../shared/data, and corrupted copies of them."""
import gzip
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SHARED_DATA, run_cli
from enhanced_tft.config.schema import build_config
from enhanced_tft.data.pipeline import build_data, load_bars
from enhanced_tft.data.sources import load_file_bars
from enhanced_tft.errors import ConfigError

STOCKS = SHARED_DATA / "us_stocks_daily_5sym_2000_2013_quandl_wiki_pd.csv.gz"
COINBASE = SHARED_DATA / "coinbase_btcusd_1h_2017_2019_raw.csv.gz"
SMALL = {"model": {"d_model": 16, "num_heads": 2, "num_transformer_blocks": 1, "ff_dim": 32,
                   "variable_hidden_size": 4}}


def _need(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"real market data {path.name} not found in {SHARED_DATA} (the shared data folder beside the "
                    "project is absent in a fresh clone)")
    return path


def _file_cfg(path, **data):
    return build_config({**SMALL, "data": {"source": "file", "path": str(path), **data}})


@pytest.fixture
def small_csv(tmp_path: Path) -> Path:
    """The first 300 bars of AAPL and of IBM from the real stock file, as a plain CSV."""
    frame = pd.read_csv(_need(STOCKS))
    frame = pd.concat([frame[frame.symbol == s].head(300) for s in ("AAPL", "IBM")])
    path = tmp_path / "small.csv"
    frame.to_csv(path, index=False)
    return path


def _corrupt(path: Path, kind: str) -> Path:
    frame = pd.read_csv(path)
    if kind == "nan":
        frame.loc[10, "close"] = np.nan
    elif kind == "duplicate":
        frame = pd.concat([frame.iloc[:21], frame.iloc[20:21], frame.iloc[21:]])
    elif kind == "negative":
        frame.loc[15, "low"] = -1.0
    elif kind == "missing_column":
        frame = frame.drop(columns=["volume"])
    out = path.with_name(f"bad_{kind}.csv")
    frame.to_csv(out, index=False)
    return out


CORRUPTIONS = {
    "nan": r"1 of 600 rows have an empty, NaN, inf or non-numeric value in a used column \(per column: close 1\), "
           r"the first at data row 11 \(line 12\); .*data.missing=drop",
    "duplicate": r"1 duplicate bars \(same symbol and timestamp as a later row\), the first AAPL at "
                 r"2000-03-29 00:00:00, data row 21 \(line 22\); .*data.duplicates=keep_last",
    "negative": r"1 of 600 rows have a price <= 0 or a negative volume \(per column: low 1\), the first at "
                r"data row 16 \(line 17\) \(AAPL 2000-03-22",
    "missing_column": r"lacks column\(s\) volume; the file has 7 column\(s\): date, symbol, open, high, low, close, "
                      r"adj_close; map our names to the file's with data.columns",
}
CLI_MESSAGES = {
    "nan": "1 of 600 rows have an empty, NaN, inf or non-numeric value in a used column (per column: close 1)",
    "duplicate": "1 duplicate bars (same symbol and timestamp as a later row), the first AAPL at 2000-03-29",
    "negative": "1 of 600 rows have a price <= 0 or a negative volume (per column: low 1)",
    "missing_column": "lacks column(s) volume; the file has 7 column(s)",
}


def test_raw_coinbase_export_loads_sorted_with_a_mapping(caplog):
    path = _need(COINBASE)
    with gzip.open(path, "rt") as handle:
        lines = handle.read().splitlines()
    rows = len(lines) - 2                               # the free-text line and the header
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = load_file_bars(_file_cfg(path, skip_rows=1, columns={"volume": "volume_btc"},
                                        timestamp_format="%Y-%m-%d %I-%p").data)
    assert rows == 20111 and len(bars) == rows
    assert list(bars.columns) == ["timestamp", "symbol", "open", "high", "low", "close", "volume"]
    assert bars["timestamp"].is_monotonic_increasing and bars["timestamp"].is_unique
    assert str(bars["timestamp"].iloc[0]) == "2017-07-01 11:00:00"
    assert str(bars["timestamp"].iloc[-1]) == "2019-10-17 09:00:00"   # '2019-10-17 09-AM', the file's first row
    assert bars["volume"].iloc[-1] == pytest.approx(61.25)             # volume_btc, not the USD volume
    assert f"sorted {rows} rows: the file was newest first" in caplog.text


def test_coinbase_without_skip_rows_or_format_says_which_key_to_set():
    path = _need(COINBASE)
    with pytest.raises(ValueError, match=r"lacks column\(s\) timestamp.*set data.skip_rows"):
        load_file_bars(_file_cfg(path).data)
    with pytest.raises(ValueError, match=r"20111 of 20111 timestamps could not be parsed, the first "
                                         r"'2019-10-17 09-AM'.*data.timestamp_format"):
        load_file_bars(_file_cfg(path, skip_rows=1).data)


def test_adjust_column_removes_the_split_jumps():
    path = _need(STOCKS)
    raw = load_file_bars(_file_cfg(path).data)
    adjusted = load_file_bars(_file_cfg(path, adjust_column="adj_close").data)

    def returns(bars, symbol):
        one = bars[bars.symbol == symbol].set_index("timestamp")["close"]
        return np.log(one).diff().abs().dropna()

    aapl_raw, aapl_adj = returns(raw, "AAPL"), returns(adjusted, "AAPL")
    # AAPL's 2:1 splits (2000-06-21, 2005-02-28) are -45%..-50% days in the raw close, and vanish when adjusted
    for day in ("2000-06-21", "2005-02-28"):
        assert aapl_raw[day] > 0.5 and aapl_adj[day] < 0.2
    # AAPL's real crash of 2000-09-29 (-52%, not a split) stays: adjustment must not smooth prices
    assert aapl_raw["2000-09-29"] == pytest.approx(aapl_adj["2000-09-29"]) and aapl_adj["2000-09-29"] > 0.7
    assert aapl_adj.drop(pd.Timestamp("2000-09-29")).max() < 0.3
    msft_raw, msft_adj = returns(raw, "MSFT"), returns(adjusted, "MSFT")
    assert msft_raw.max() > 0.5 and msft_adj.max() < 0.3               # the 2003-02-18 split
    assert len(adjusted) == len(raw) == 12154


def test_fb_listed_in_2012_is_left_out_by_the_shared_cut_dates_and_the_run_goes_on(caplog):
    cfg = _file_cfg(_need(STOCKS), sequence_length=60, adjust_column="adj_close")
    with caplog.at_level(logging.WARNING, logger="enhanced_tft"):
        bundle = build_data(cfg)
    assert bundle.symbols == ["AAPL", "GOOG", "IBM", "MSFT"]
    assert "left out symbol 'FB': no training window before 2009-04-06 14:24:00 (its 196 bars start at 2012-05-18" \
        in caplog.text
    assert len(bundle.splits["test"]) == 1716


def test_fb_is_too_short_for_60_bars_error_or_skip_with_per_symbol_splits(caplog):
    cfg = _file_cfg(_need(STOCKS), sequence_length=60, adjust_column="adj_close", split="per_symbol")
    bars = load_bars(cfg)
    with pytest.raises(ValueError, match=r"symbol 'FB' has 196 bars: after 31 warm-up bars, sequence_length=60.*"
                                         r"val 0, test 0.*data.too_short=skip"):
        build_data(cfg, bars)
    skip = _file_cfg(STOCKS, sequence_length=60, adjust_column="adj_close", too_short="skip", split="per_symbol")
    with caplog.at_level(logging.WARNING, logger="enhanced_tft"):
        bundle = build_data(skip, bars)
    assert bundle.symbols == ["AAPL", "GOOG", "IBM", "MSFT"]
    assert "skipped symbol 'FB' has 196 bars" in caplog.text
    assert "left out 1 of 5 symbols, too short (data.too_short=skip)" in caplog.text
    assert len(bundle.splits["test"]) > 1000


def test_every_symbol_too_short_is_a_clear_error(small_csv):
    cfg = _file_cfg(small_csv, sequence_length=100, too_short="skip", split="per_symbol")
    with pytest.raises(ValueError, match=r"every symbol is too short and was skipped \(AAPL, IBM\)"):
        build_data(cfg)
    with pytest.raises(ValueError, match=r"no symbol has a window in the val or test split \(val from .* for every "
                                         r"symbol; sequence_length=100, horizon=1\)"):
        build_data(_file_cfg(small_csv, sequence_length=100, too_short="skip"))


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupted_copies_give_their_own_message(small_csv, kind):
    with pytest.raises(ValueError, match=CORRUPTIONS[kind]):
        load_file_bars(_file_cfg(_corrupt(small_csv, kind)).data)


def test_policies_drop_what_they_say(small_csv, caplog):
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        dropped = load_file_bars(_file_cfg(_corrupt(small_csv, "nan"), missing="drop").data)
        kept = load_file_bars(_file_cfg(_corrupt(small_csv, "duplicate"), duplicates="keep_last").data)
    assert len(dropped) == 599 and len(kept) == 600
    assert "dropped 1 of 600 rows with an empty, NaN, inf or non-numeric value (per column: close 1" in caplog.text
    assert "dropped 1 duplicate bars" in caplog.text


def test_parquet_single_symbol_and_unreadable_files(small_csv, tmp_path):
    frame = pd.read_csv(small_csv)
    aapl = frame[frame.symbol == "AAPL"].drop(columns=["symbol"]).rename(columns={"date": "Date", "close": "Last"})
    aapl.iloc[::-1].to_parquet(tmp_path / "aapl.parquet")
    bars = load_file_bars(_file_cfg(tmp_path / "aapl.parquet", symbol="AAPL", columns={"close": "Last"}).data)
    assert len(bars) == 300 and set(bars.symbol) == {"AAPL"} and bars.timestamp.is_monotonic_increasing
    np.testing.assert_allclose(bars.close, frame[frame.symbol == "AAPL"].close)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really parquet")
    with pytest.raises(ValueError, match=r"could not be read as Parquet"):
        load_file_bars(_file_cfg(tmp_path / "junk.parquet").data)
    (tmp_path / "junk.csv.gz").write_bytes(b"\x1f\x8b\x08 broken gzip")
    with pytest.raises(ValueError, match=r"could not be read as CSV \(gzip\)"):
        load_file_bars(_file_cfg(tmp_path / "junk.csv.gz").data)
    with pytest.raises(ValueError, match=r"does not exist \(data.path\)"):
        load_file_bars(_file_cfg(tmp_path / "nope.csv").data)
    with pytest.raises(ConfigError, match=r"source='file' needs data.path"):
        build_config({"data": {"source": "file"}})


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_cli_bad_file_exits_2_with_the_message(small_csv, tmp_path, kind):
    bad = _corrupt(small_csv, kind)
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--data", str(bad), "--test_mode",
                      "--log_dir", str(tmp_path / "logs")], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "etft train: error: data file" in result.stderr
    assert CLI_MESSAGES[kind] in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_trains_on_the_stock_file(tmp_path):
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--data", str(_need(STOCKS)), "--test_mode",
                      "--set", "data.adjust_column=adj_close", "--set", "data.too_short=skip",
                      "--set", "data.val_fraction=0.04", "--set", "data.test_fraction=0.04",
                      "--set", "train.max_steps_per_epoch=2",
                      "--log_dir", str(tmp_path / "logs")], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = sorted((tmp_path / "logs").glob("training_*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["task"] == "classification_binary" and summary["test"]["num_samples"] == 412
    assert 0.0 <= summary["test"]["accuracy"] <= 1.0
    log = (run / "training.log").read_text()
    assert "loaded 12154 bars of 5 symbol(s)" in log and "training on 4: AAPL, GOOG, IBM, MSFT" in log
    assert "left out symbol 'FB': no training window before 2012-02-15 03:50:24" in log   # one cut for all
    assert ("samples: train 10698, val 428, test 412 (val from 2012-02-15 03:50:24, test from 2012-08-23 01:55:12 for "
            "every symbol; sequence_length 24") in log
    saved = (run / "config.yaml").read_text()
    assert "source: file" in saved and str(STOCKS) in saved


def test_example_index_bars_from_the_arch_package(monkeypatch):
    bars = load_bars(build_config({"data": {"source": "sp500"}}))
    assert len(bars) == 5031 and set(bars["symbol"]) == {"SP500"} and bars["timestamp"].is_monotonic_increasing
    assert str(bars["timestamp"].iloc[0].date()) == "1999-01-04" and str(bars["timestamp"].iloc[-1].date()) == "2018-12-31"
    assert bars["close"].iloc[-1] == pytest.approx(2506.850098)
    nasdaq = load_bars(build_config({"data": {"source": "nasdaq"}}))
    assert set(nasdaq["symbol"]) == {"NASDAQ"} and len(nasdaq) == 5031
    import importlib.util
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"`arch` package, which is not installed: pip install 'enhanced-tft\[examples\]'"):
        load_bars(build_config({"data": {"source": "sp500"}}))
    with pytest.raises(ConfigError, match="data.path='x.csv' is set but source='sp500' would ignore it"):
        build_config({"data": {"source": "sp500", "path": "x.csv"}})
