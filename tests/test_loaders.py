"""The file loader on small files each test writes itself (a clone without ../shared tests these too): formats,
mappings, policies, encodings, null symbols, name collisions, and CSV chunk boundaries."""
import gzip
import logging

import numpy as np
import pandas as pd
import pytest

from enhanced_tft.config.schema import build_config, load_config
from enhanced_tft.data import reader
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.data.sources import OUTPUT, load_file_bars


def _bars(symbols=("AAA", "BBB"), num_bars=50, seed=0) -> pd.DataFrame:
    """Hourly bars of each symbol, timestamps as text; floats survive a CSV round trip exactly."""
    rng = np.random.default_rng(seed)
    frames = []
    for symbol in symbols:
        close = 100.0 * np.exp(np.cumsum(rng.normal(0.0, 0.01, num_bars)))
        frames.append(pd.DataFrame({
            "timestamp": pd.date_range("2021-01-04", periods=num_bars, freq="h").strftime("%Y-%m-%d %H:%M:%S"),
            "symbol": symbol, "open": close * (1 + rng.normal(0.0, 0.002, num_bars)), "high": close * 1.01,
            "low": close * 0.99, "close": close, "volume": rng.integers(100, 1000, num_bars).astype(float)}))
    return pd.concat(frames, ignore_index=True)


def _load(path, **data) -> pd.DataFrame:
    return load_file_bars(build_config({"data": {"source": "file", "path": str(path), **data}}).data)


def _csv(tmp_path, frame: pd.DataFrame, name="bars.csv", **to_csv):
    path = tmp_path / name
    frame.to_csv(path, index=False, **to_csv)
    return path


def test_parquet_reads_only_the_used_columns_and_equals_the_csv(tmp_path, monkeypatch):
    frame = _bars().assign(note="text", signal=np.arange(100.0))
    frame.to_parquet(tmp_path / "bars.parquet")
    asked = []
    read_parquet = pd.read_parquet
    monkeypatch.setattr(pd, "read_parquet", lambda path, columns=None: asked.append(columns) or read_parquet(
        path, columns=columns))
    from_parquet = _load(tmp_path / "bars.parquet")
    assert asked == [["timestamp", "symbol", "open", "high", "low", "close", "volume"]]
    pd.testing.assert_frame_equal(from_parquet, _load(_csv(tmp_path, frame)))
    np.testing.assert_array_equal(from_parquet["close"], frame["close"])
    with_all = _load(tmp_path / "bars.parquet", extra_columns="all")   # every column is a candidate: all read
    assert asked[-1] is None and list(with_all.columns) == [*OUTPUT, "signal"]
    np.testing.assert_array_equal(with_all["signal"], np.arange(100.0))


def test_gzip_csv_equals_the_plain_csv(tmp_path):
    plain = _csv(tmp_path, _bars())
    (tmp_path / "bars.csv.gz").write_bytes(gzip.compress(plain.read_bytes()))
    pd.testing.assert_frame_equal(_load(tmp_path / "bars.csv.gz"), _load(plain))


def test_column_mapping_and_lines_before_the_header(tmp_path):
    frame = _bars(("ZZZ",), num_bars=30).rename(columns={"timestamp": "Date", "symbol": "Ticker", "close": "Last",
                                                         "volume": "Vol"})
    path = tmp_path / "export.csv"
    path.write_text("Exported by a broker\nprices in USD\n" + frame.to_csv(index=False))
    bars = _load(path, skip_rows=2, columns={"symbol": "Ticker", "close": "Last", "volume": "Vol"})
    assert list(bars.columns) == list(OUTPUT) and set(bars.symbol) == {"ZZZ"} and len(bars) == 30
    np.testing.assert_array_equal(bars["close"], frame["Last"])
    np.testing.assert_array_equal(bars["volume"], frame["Vol"])
    assert str(bars["timestamp"].iloc[-1]) == "2021-01-05 05:00:00"
    with pytest.raises(ValueError, match=r"could not be read as CSV with data.skip_rows=0 \(ParserError: .*Expected 1 "
                                         r"fields in line 3, saw 7\).*set data.skip_rows to their number"):
        _load(path, columns={"symbol": "Ticker", "close": "Last", "volume": "Vol"})


def test_timestamp_format_parses_and_a_wrong_one_is_named(tmp_path):
    frame = _bars(("AAA",), num_bars=30)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"]).dt.strftime("%d.%m.%Y %H:%M")
    path = _csv(tmp_path, frame)
    bars = _load(path, timestamp_format="%d.%m.%Y %H:%M")
    assert str(bars["timestamp"].iloc[0]) == "2021-01-04 00:00:00" and str(bars["timestamp"].iloc[29]) == \
        "2021-01-05 05:00:00"
    with pytest.raises(ValueError, match=r"30 of 30 timestamps could not be parsed, the first '04.01.2021 00:00' at "
                                         r"data row 1 \(line 2\); data.timestamp_format='%Y-%m-%d %H:%M' does not "
                                         r"match it; fix the format"):
        _load(path, timestamp_format="%Y-%m-%d %H:%M")
    with pytest.raises(ValueError, match=r"data.timestamp_format='%d.%m.%Y %Q' is not usable"):
        _load(path, timestamp_format="%d.%m.%Y %Q")


def test_adjust_column_scales_prices_by_adj_over_close_and_volume_by_its_inverse(tmp_path):
    frame = _bars(("AAA",), num_bars=20)
    factor = np.where(np.arange(20) < 10, 0.5, 1.0)                   # a 2:1 split between rows 9 and 10
    frame["Adj Close"] = frame["close"] * factor
    bars = _load(_csv(tmp_path, frame), adjust_column="Adj Close")
    applied = frame["Adj Close"] / frame["close"]
    for column in ("open", "high", "low", "close"):
        np.testing.assert_allclose(bars[column], frame[column] * applied, rtol=1e-15)
    np.testing.assert_allclose(bars["volume"], frame["volume"] / applied, rtol=1e-15)
    assert bars["volume"].iloc[0] == pytest.approx(2 * frame["volume"].iloc[0])
    assert bars["close"].iloc[10] == frame["close"].iloc[10] and list(bars.columns) == list(OUTPUT)


def test_duplicates_stop_or_keep_the_later_row(tmp_path, caplog):
    frame = _bars()
    again = frame.iloc[[5]].assign(close=frame["close"].iloc[5] * 1.001)
    path = _csv(tmp_path, pd.concat([frame.iloc[:30], again, frame.iloc[30:]]))
    with pytest.raises(ValueError, match=r"1 duplicate bars \(same symbol and timestamp as a later row\), the first "
                                         r"AAA at 2021-01-04 05:00:00, data row 6 \(line 7\); remove them, or set "
                                         r"data.duplicates=keep_last"):
        _load(path)
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = _load(path, duplicates="keep_last")
    assert len(bars) == 100 and bars["close"].iloc[5] == again["close"].iloc[0]
    assert "dropped 1 duplicate bars (same symbol and timestamp), kept the later row" in caplog.text


def test_missing_values_stop_or_are_dropped(tmp_path, caplog):
    frame = _bars().astype({"close": object})
    frame.loc[7, "close"] = ""
    frame.loc[60, "volume"] = np.inf
    path = _csv(tmp_path, frame)
    with pytest.raises(ValueError, match=r"2 of 100 rows have an empty, NaN, inf or non-numeric value in a used column "
                                         r"\(per column: close 1, volume 1\), the first at data row 8 \(line 9\); fix "
                                         r"the file, or set data.missing=drop"):
        _load(path)
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = _load(path, missing="drop")
    assert len(bars) == 98 and np.isfinite(bars[["close", "volume"]].to_numpy()).all()
    assert "dropped 2 of 100 rows with an empty, NaN, inf or non-numeric value (per column: close 1, volume 1" \
        in caplog.text


def test_a_newest_first_file_is_sorted(tmp_path, caplog):
    frame = _bars()
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = _load(_csv(tmp_path, frame.iloc[::-1]))
    assert "sorted 100 rows: the file was newest first" in caplog.text
    pd.testing.assert_frame_equal(bars, _load(_csv(tmp_path, frame, name="oldest_first.csv")))
    assert bars.groupby("symbol")["timestamp"].apply(lambda t: t.is_monotonic_increasing).all()


def test_gaps_are_reported_and_filled_with_flat_bars(tmp_path, caplog):
    frame = _bars(("AAA",), num_bars=30)
    path = _csv(tmp_path, frame.drop(index=[10, 11, 20]))      # 2 bars missing before row 12, 1 before row 21
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        one = _load(path, fill_gaps=1)
    assert "2 gaps (steps longer than the symbol's usual step, 3 missing bars in all)" in caplog.text
    assert "filled the 1 of at most 1 missing bars with 1 flat bars (data.fill_gaps)" in caplog.text
    assert len(one) == 28 and str(one["timestamp"].iloc[18]) == "2021-01-04 20:00:00"
    two = _load(path, fill_gaps=2)
    expected_times = pd.to_datetime(frame["timestamp"])
    assert len(two) == 30 and (two["timestamp"].to_numpy() == expected_times.to_numpy()).all()
    for row, previous in ((10, 9), (11, 9), (20, 19)):
        flat = two.iloc[row]
        assert flat["open"] == flat["high"] == flat["low"] == flat["close"] == frame["close"].iloc[previous]
        assert flat["volume"] == 0.0
    np.testing.assert_array_equal(two["close"].iloc[12:20], frame["close"].iloc[12:20])
    assert len(_load(path)) == 27                                 # fill_gaps=0: reported only


def test_too_short_symbol_stops_or_is_skipped_by_build_data(tmp_path, caplog):
    path = _csv(tmp_path, pd.concat([_bars(("AAA",), num_bars=400), _bars(("BBB",), num_bars=40, seed=1)]))
    # per-symbol fractions: data.too_short decides (shared cut dates leave such a symbol out: test_time_splits.py)
    overrides = ["data.source=file", f"data.path={path}", "data.sequence_length=16", "data.split=per_symbol"]
    with pytest.raises(ValueError, match=r"symbol 'BBB' has 40 bars: after 31 warm-up bars, sequence_length=16 and "
                                         r"horizon=1 leave samples train 0, val 0, test 0.*data.too_short=skip"):
        build_data(load_config(None, overrides))
    with caplog.at_level(logging.WARNING, logger="enhanced_tft"):
        bundle = build_data(load_config(None, [*overrides, "data.too_short=skip"]))
    assert bundle.symbols == ["AAA"] and "skipped symbol 'BBB' has 40 bars" in caplog.text
    assert len(bundle.splits["train"]) == int(369 * 0.7) - 16 + 1 - 1


@pytest.mark.parametrize("compressed", [False, True])
def test_encoding_is_honoured_and_a_wrong_one_gets_advice(tmp_path, compressed):
    frame = _bars(("SOCIÉTÉ", "BBB"), num_bars=20)
    text = frame.to_csv(index=False).encode("latin-1")
    path = tmp_path / ("latin1.csv.gz" if compressed else "latin1.csv")
    path.write_bytes(gzip.compress(text) if compressed else text)
    bars = _load(path, encoding="latin-1")
    assert sorted(bars["symbol"].unique()) == ["BBB", "SOCIÉTÉ"] and len(bars) == 40
    with pytest.raises(ValueError) as refused:
        _load(path)
    assert str(refused.value) == (
        f"data file {str(path)!r} is not utf-8 text, the encoding it was read with (data.encoding='utf-8'; invalid "
        "continuation byte: byte 0xc9); exports of Excel and other Windows programs are often latin-1 or cp1252: "
        "set --set data.encoding=latin-1 (or cp1252)")


@pytest.mark.parametrize("dtype,null", [("string", pd.NA), (object, None), (object, np.nan)])
def test_a_null_symbol_is_a_missing_value_not_a_symbol(tmp_path, caplog, dtype, null):
    frame = _bars(("AAA",), num_bars=6)
    frame["symbol"] = pd.array(["AAA", "AAA", null, "AAA", "AAA", "AAA"], dtype=dtype)
    frame.to_parquet(tmp_path / "nulls.parquet")
    with pytest.raises(ValueError, match=r"1 of 6 rows have an empty, NaN, inf or non-numeric value in a used column "
                                         r"\(per column: symbol 1\), the first at row 3; .*data.missing=drop"):
        _load(tmp_path / "nulls.parquet")
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = _load(tmp_path / "nulls.parquet", missing="drop")
    assert set(bars["symbol"]) == {"AAA"} and len(bars) == 5
    assert "dropped 1 of 6 rows with an empty, NaN, inf or non-numeric value (per column: symbol 1" in caplog.text


def test_the_text_na_is_refused_as_a_symbol(tmp_path):
    frame = _bars()
    frame.loc[2, "symbol"] = "<NA>"
    with pytest.raises(ValueError, match=r"1 rows have the symbol '<NA>', the first at data row 3 \(line 4\); '<NA>' "
                                         r"is the text pandas writes for a missing value, not a symbol"):
        _load(_csv(tmp_path, frame))


def test_extra_columns_named_like_a_feature_are_refused_or_left_out(tmp_path, caplog):
    frame = _bars(num_bars=200).rename(columns={"volume": "volume_btc"})
    frame["volume"] = frame["volume_btc"] * 1000.0                       # a second volume, in USD
    frame["ret_1"], frame["hour_sin"], frame["signal"], frame["note"] = 0.5, 0.25, np.arange(400.0), "text"
    path = _csv(tmp_path, frame)
    for named in (["ret_1"], ["signal", "hour_sin"]):
        with pytest.raises(ValueError, match=rf"data.extra_columns names {named[-1]}, the name of a feature computed "
                                             r"from the bars \(ret_1, ret_2, .*, hour_sin, hour_cos, dow_sin, dow_cos\)"
                                             r".*rename the column in the file, or drop it from data.extra_columns"):
            _load(path, columns={"volume": "volume_btc"}, extra_columns=named)
    with caplog.at_level(logging.INFO, logger="enhanced_tft"):
        bars = _load(path, columns={"volume": "volume_btc"}, extra_columns="all")
    assert "extra_columns=all: left out column(s) volume, ret_1, hour_sin, named like a bar column or a computed " \
           "feature" in caplog.text
    assert "left out non-numeric column(s) note" in caplog.text
    assert list(bars.columns) == [*OUTPUT, "signal"]
    np.testing.assert_array_equal(bars["volume"], frame["volume_btc"])   # not overwritten by the file's `volume`
    cfg = load_config(None, ["data.source=file", f"data.path={path}", "data.columns={volume: volume_btc}",
                             "data.extra_columns=all", "data.sequence_length=8"])
    names = build_data(cfg).observed_names
    assert names.count("ret_1") == 1 and names[-1] == "signal" and len(names) == len(set(names)) == 14


def test_chunks_give_the_frame_of_one_read(tmp_path, monkeypatch):
    frame = _bars(("AAA", "BBB", "CCC"), num_bars=40).astype({"volume": object})
    frame["signal"] = np.arange(120.0)
    frame["note"] = np.where(np.arange(120) == 35, "n/a", "1.5")         # not a number only in the 6th chunk of 7
    frame.loc[50, "volume"] = ""
    path = _csv(tmp_path, frame.iloc[::-1])
    settings = [{"extra_columns": "all", "missing": "drop"},
                {"symbol": "BBB", "extra_columns": ["signal"], "missing": "drop"}]
    whole = [_load(path, **data) for data in settings]
    monkeypatch.setattr(reader, "CSV_CHUNK_ROWS", 7)
    for data, expected in zip(settings, whole):
        pd.testing.assert_frame_equal(_load(path, **data), expected, check_exact=True)
    assert list(whole[0].columns) == [*OUTPUT, "signal"] and len(whole[0]) == 119
    assert len(whole[1]) == 39 and set(whole[1]["symbol"]) == {"BBB"}
    np.testing.assert_array_equal(whole[1]["signal"], np.setdiff1d(np.arange(40.0, 80.0), [50.0]))


def test_a_bad_value_in_the_third_chunk_is_named_at_its_row(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CSV_CHUNK_ROWS", 10)
    frame = _bars().astype({"close": object})
    frame.loc[25, "close"] = "12,5"                                   # data row 26: the 3rd chunk (rows 21-30)
    path = tmp_path / "bad.csv"
    path.write_text("a title line\n\n" + frame.to_csv(index=False))
    with pytest.raises(ValueError, match=r"1 of 100 rows have an empty, NaN, inf or non-numeric value in a used column "
                                         r"\(per column: close 1\), the first at data row 26 \(line 29\);"):
        _load(path, skip_rows=2)


def test_the_timestamp_format_is_inferred_once_for_the_whole_file(tmp_path, monkeypatch):
    monkeypatch.setattr(reader, "CSV_CHUNK_ROWS", 10)
    frame = _bars()
    later = pd.to_datetime(frame["timestamp"].iloc[30:40]).dt.strftime("%m/%d/%Y %H:%M")
    frame.loc[30:39, "timestamp"] = later.to_numpy()                   # the 4th chunk in another format
    with pytest.raises(ValueError, match=r"10 of 100 timestamps could not be parsed, the first '01/05/2021 06:00' "
                                         r"at data row 31 \(line 32\); set data.timestamp_format"):
        _load(_csv(tmp_path, frame))
