"""Date splits for file data: one set of cut dates for every symbol from the pooled timeline, so that no
symbol trains on a period another symbol is tested on; a symbol listed after the training period is left
out with a warning and the run goes on."""
import numpy as np
import pandas as pd
import pytest

from enhanced_tft.config.schema import load_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.data.synthetic import generate_bars
from enhanced_tft.errors import UserError

HORIZON = 3
SEQUENCE_LENGTH = 16


def _staggered_csv(tmp_path) -> str:
    """Three symbols of hourly bars: AAA from the start, BBB from 60% of the span, LATE from 90% (in the test
    period of the shared cuts)."""
    bars = generate_bars(3, 2000, seed=3)
    names = {"SYN000": "AAA", "SYN001": "BBB", "SYN002": "LATE"}
    bars["symbol"] = bars["symbol"].map(names)
    start = {"AAA": 0, "BBB": 1200, "LATE": 1800}
    position = bars.groupby("symbol").cumcount()
    bars = bars[position >= bars["symbol"].map(start)]
    path = tmp_path / "staggered.csv"
    bars.to_csv(path, index=False)
    return str(path)


def _build(path: str, *extra: str):
    cfg = load_config(None, ["data.source=file", f"data.path={path}", f"data.sequence_length={SEQUENCE_LENGTH}",
                             f"data.horizon={HORIZON}", *extra])
    return build_data(cfg)


def _times(split, offset: int = 0) -> np.ndarray:
    """Timestamps of each sample's last bar (+ offset rows: HORIZON gives the target's bar)."""
    stamps = split.arrays.timestamp.numpy().view("datetime64[ns]")
    return stamps[split.sample_ends.numpy() + offset]


def _symbols(data, split) -> set[str]:
    ids = data.splits[split].arrays.symbol.numpy()[data.splits[split].sample_ends.numpy()]
    return {data.symbols[i] for i in np.unique(ids)}


def test_no_training_target_at_or_after_the_first_test_window_for_symbols_listed_at_other_dates(tmp_path, caplog):
    data = _build(_staggered_csv(tmp_path))
    train, val, test = (data.splits[s] for s in ("train", "val", "test"))
    first_test_window = _times(test, -(SEQUENCE_LENGTH - 1)).min()
    assert _times(train, HORIZON).max() < first_test_window        # every training target is known before it
    assert _times(val, HORIZON).max() < _times(test).min()
    # one set of cuts: every symbol's test samples start after the same date, its train samples end before one
    assert _times(train).max() < _times(val).min() and _times(val).max() < _times(test).min()
    assert data.symbols == ["AAA", "BBB"]                           # LATE has no bar before the cut: left out
    assert "left out symbol 'LATE': no training window before" in caplog.text
    assert _symbols(data, "train") == _symbols(data, "test") == {"AAA", "BBB"}


def test_the_cut_dates_are_fractions_of_the_pooled_time_span(tmp_path):
    data = _build(_staggered_csv(tmp_path), "data.val_fraction=0.2", "data.test_fraction=0.2")
    span_start, span_end = pd.Timestamp("2020-01-01"), pd.Timestamp("2020-01-01") + pd.Timedelta(hours=1999)
    val_cut = span_start + 0.6 * (span_end - span_start)
    test_cut = span_start + 0.8 * (span_end - span_start)
    assert pd.Timestamp(_times(data.splits["val"]).min()) >= val_cut
    assert pd.Timestamp(_times(data.splits["train"], HORIZON).max()) < val_cut
    assert pd.Timestamp(_times(data.splits["test"]).min()) >= test_cut
    # the first samples after each cut: within the purge gap and the window of it
    assert pd.Timestamp(_times(data.splits["test"]).min()) <= test_cut + pd.Timedelta(hours=HORIZON + SEQUENCE_LENGTH)


def test_per_symbol_fractions_stay_an_option_and_show_the_overlap_they_allow(tmp_path):
    data = _build(_staggered_csv(tmp_path), "data.split=per_symbol", "data.too_short=skip")
    stamps = data.splits["train"].arrays.timestamp.numpy().view("datetime64[ns]")
    symbol = data.splits["train"].arrays.symbol.numpy()
    train_ends = data.splits["train"].sample_ends.numpy()
    late_train = stamps[train_ends[symbol[train_ends] == data.symbols.index("BBB")] + HORIZON].max()
    aaa_test = data.splits["test"].sample_ends.numpy()
    aaa_test = stamps[aaa_test[symbol[aaa_test] == data.symbols.index("AAA")]].min()
    assert late_train > aaa_test      # BBB trains on bars of AAA's test period: what data.split=time prevents


def test_walk_forward_folds_share_their_cut_dates_too(tmp_path):
    path = _staggered_csv(tmp_path)
    folds = [_build(path, "data.walk_forward_folds=3", f"data.fold={k}") for k in range(3)]
    tests = [(_times(f.splits["test"]).min(), _times(f.splits["test"]).max()) for f in folds]
    for earlier, later in zip(tests, tests[1:]):
        assert earlier[1] < later[0]                                # consecutive test blocks in time
    for fold in folds:
        assert _times(fold.splits["train"], HORIZON).max() < _times(fold.splits["test"], -(SEQUENCE_LENGTH - 1)).min()


def test_a_split_that_no_symbol_reaches_is_refused_with_the_cut_dates(tmp_path):
    bars = generate_bars(1, 300, seed=2)
    path = tmp_path / "short.csv"
    bars.to_csv(path, index=False)
    with pytest.raises(UserError, match=r"split \(val from 2020-01-\d\d .*, test from 2020-01-\d\d .* for every "
                                        r"symbol; sequence_length=120"):
        _build(str(path), "data.sequence_length=120", "data.val_fraction=0.1", "data.test_fraction=0.1")


def test_a_run_config_written_before_data_split_existed_keeps_its_per_symbol_splits(tmp_path):
    from enhanced_tft.config.schema import load_run_config
    old = tmp_path / "config.yaml"
    old.write_text("data:\n  source: synthetic\n  num_bars: 900\n")
    assert load_run_config(old).data.split == "per_symbol"       # what that version split by
    new = tmp_path / "new.yaml"
    new.write_text("data:\n  split: time\n")
    assert load_run_config(new).data.split == "time"
