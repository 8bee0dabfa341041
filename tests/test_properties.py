"""Property tests: any config value and any small corrupted CSV either works or fails with one clear message."""
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import examples
from enhanced_tft.config.schema import Config, build_config, load_config
from enhanced_tft.config.yaml_io import load_yaml_text
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.data.synthetic import generate_bars
from enhanced_tft.errors import ConfigError

KEYS = ["model.d_model", "model.num_heads", "model.dropout_rate", "model.ff_dim", "data.sequence_length",
        "data.horizon", "data.val_fraction", "data.test_fraction", "train.micro_batch_size", "train.epochs",
        "train.gradient_accumulation_steps", "train.effective_batch_size", "train.learning_rate",
        "train.mixed_precision", "train.activation_checkpointing", "task", "data.return_lags", "model.typo",
        "train", "data.source", "data.skip_rows"]
VALUES = st.one_of(st.integers(-5, 300), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.none(), st.text(max_size=8), st.lists(st.integers(-2, 30), max_size=3),
                   st.sampled_from(["auto", "bf16", "fp16", "all", "blocks", "regression", "1e-3", "file"]))


def _one_paragraph(message: str) -> None:
    assert message.strip() and "\n\n" not in message and "Traceback" not in message


@settings(max_examples=examples(60), deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=4))
def test_any_config_value_is_accepted_or_named_in_the_error(assignments):
    overrides = [f"{key}={override_text(key, value)}" for key, value in assignments.items()]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as err:
        _one_paragraph(str(err))
        assert any(key.split(".")[-1] in str(err) or key.split(".")[0] in str(err) for key in assignments)
    else:
        assert isinstance(cfg, Config)
        assert cfg.model.d_model % cfg.model.num_heads == 0 and 0 <= cfg.model.dropout_rate < 1
        applied = cfg.model_dump()
        for key, value in assignments.items():   # every accepted override is in the config, as given
            node = applied
            for part in key.split("."):
                node = node[part]
            assert node == load_yaml_text(override_text(key, value)), key


def override_text(key: str, value) -> str:
    """The text after `=` in the override the test passes for `value`."""
    return repr(value) if isinstance(value, str) else str(value)


CORRUPTIONS = ["nan_close", "negative_price", "duplicate_bar", "drop_column", "text_in_number", "bad_timestamp",
               "shuffle", "truncate", "empty", "inf_volume", "zero_volume", "header_only"]


def _clean_frame() -> pd.DataFrame:
    bars = generate_bars(2, 300, seed=5)
    return bars.assign(timestamp=bars["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"))


def _corrupt(frame: pd.DataFrame, kind: str, row: int, column: str) -> str:
    frame = frame.copy()
    row = row % len(frame)
    if column not in frame.columns or "close" not in frame.columns or "timestamp" not in frame.columns:
        return frame.to_csv(index=False)   # an earlier corruption dropped what this one would change
    if kind == "nan_close":
        frame.loc[row, "close"] = np.nan
    elif kind == "negative_price":
        frame.loc[row, column] = -abs(frame.loc[row, column])
    elif kind == "duplicate_bar":
        frame = pd.concat([frame, frame.iloc[[row]]], ignore_index=True)
    elif kind == "drop_column":
        frame = frame.drop(columns=[column])
    elif kind == "text_in_number":
        frame[column] = frame[column].astype(object)
        frame.loc[row, column] = "n/a?"
    elif kind == "bad_timestamp":
        frame.loc[row, "timestamp"] = "yesterday"
    elif kind == "shuffle":
        frame = frame.sample(frac=1.0, random_state=row)
    elif kind == "truncate":
        return frame.to_csv(index=False)[: 200 + row]
    elif kind == "empty":
        return ""
    elif kind == "inf_volume":
        frame.loc[row, "volume"] = np.inf
    elif kind == "zero_volume":
        frame.loc[row, "volume"] = 0.0
    elif kind == "header_only":
        return ",".join(frame.columns) + "\n"
    return frame.to_csv(index=False)


@pytest.fixture(scope="module")
def clean_frame():
    return _clean_frame()


@settings(max_examples=examples(30), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=2), row=st.integers(0, 599),
       column=st.sampled_from(["open", "high", "low", "close", "volume"]),
       policy=st.sampled_from([("error", "error"), ("keep_last", "drop")]))
def test_any_corrupted_csv_loads_or_fails_with_one_clear_message(tmp_path_factory, clean_frame, kinds, row, column,
                                                                policy):
    text = clean_frame.to_csv(index=False)
    for kind in kinds:
        frame = pd.read_csv(pd.io.common.StringIO(text)) if text.strip() else clean_frame.iloc[:0]
        try:
            text = _corrupt(frame, kind, row, column) if len(frame) else text
        except (TypeError, ValueError):
            pass   # this corruption does not apply to what an earlier one left (text where numbers were, say)
    path = tmp_path_factory.mktemp("csv") / "bars.csv"
    path.write_text(text)
    raw = {"data": {"source": "file", "path": str(path), "sequence_length": 16, "duplicates": policy[0],
                    "missing": policy[1]}}
    try:
        data = build_data(build_config(raw))
    except ValueError as err:   # ConfigError included
        _one_paragraph(str(err))
        assert len(str(err)) < 2000
    else:
        split = data.splits["train"]
        assert len(split) > 0 and np.isfinite(split.arrays.observed.numpy()).all()
        assert np.isfinite(split.arrays.raw_return[split.sample_ends].numpy()).all()


# what one corruption must lead to, under data.duplicates / data.missing = error / error and keep_last / drop:
# None = the file loads; text = the one message's telling part
OUTCOMES = {
    "nan_close": ("have an empty, NaN, inf or non-numeric value in a used column (per column: close 1)", None),
    "negative_price": ("have a price <= 0 or a negative volume", "have a price <= 0 or a negative volume"),
    "duplicate_bar": ("1 duplicate bars (same symbol and timestamp as a later row)", None),
    "drop_column": ("lacks column(s) {column}", "lacks column(s) {column}"),
    "text_in_number": ("have an empty, NaN, inf or non-numeric value in a used column (per column: {column} 1)", None),
    "bad_timestamp": ("1 of 600 timestamps could not be parsed, the first 'yesterday'",
                      "1 of 600 timestamps could not be parsed, the first 'yesterday'"),
    "shuffle": (None, None),
    "inf_volume": ("have an empty, NaN, inf or non-numeric value in a used column (per column: volume 1)", None),
    "zero_volume": (None, None),
    "empty": ("could not be read as CSV", "could not be read as CSV"),
    "header_only": ("has a header (timestamp, symbol, open, high, low, close, volume) but no rows of bars",
                    "has a header (timestamp, symbol, open, high, low, close, volume) but no rows of bars"),
}


@settings(max_examples=examples(20), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(OUTCOMES)), row=st.integers(0, 599),
       column=st.sampled_from(["open", "high", "low", "close", "volume"]), strict=st.booleans())
def test_each_corruption_has_its_own_outcome(tmp_path_factory, clean_frame, kind, row, column, strict):
    path = tmp_path_factory.mktemp("csv") / "bars.csv"
    path.write_text(_corrupt(clean_frame, kind, row, column))
    expected = OUTCOMES[kind][0 if strict else 1]
    if kind == "negative_price" and column == "volume" and clean_frame.loc[row % 600, "volume"] == 0:
        expected = None   # -0.0 is not negative: a volume of zero stays allowed
    raw = {"data": {"source": "file", "path": str(path), "sequence_length": 16,
                    "duplicates": "error" if strict else "keep_last", "missing": "error" if strict else "drop"}}
    if expected is None:
        data = build_data(build_config(raw))
        kept = sum(len(data.splits[s]) for s in ("train", "val", "test"))
        assert kept > 0.8 * (600 - 2 * 31 - 3 * 16)   # both symbols are there, nearly every window with them
    else:
        with pytest.raises(ValueError) as caught:
            build_data(build_config(raw))
        assert expected.format(column=column) in str(caught.value)
        _one_paragraph(str(caught.value))


@settings(max_examples=examples(4), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(CORRUPTIONS), row=st.integers(0, 599),
       column=st.sampled_from(["open", "high", "low", "close", "volume"]))
@pytest.mark.slow
def test_the_cli_trains_or_exits_2_on_any_corrupted_csv(tmp_path_factory, clean_frame, kind, row, column):
    """End to end through the real command, bounded by a timeout: exit 0 with a summary, or 2 with one message."""
    import json

    from conftest import run_cli
    folder = tmp_path_factory.mktemp("cli")
    path = folder / "bars.csv"
    path.write_text(_corrupt(clean_frame, kind, row, column))
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--data", str(path), "--test_mode", "--log_dir",
                      str(folder / "logs"), "--set", "data.sequence_length=16", "--set", "train.max_steps_per_epoch=3"],
                     cwd=folder, timeout=180)
    if result.returncode == 0:
        run = next((folder / "logs").glob("training_*"))
        assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    else:
        assert result.returncode == 2, result.stderr
        message = result.stderr.strip().splitlines()[-1]
        assert message.startswith("etft train: error: data file") or "invalid config" in result.stderr
        _one_paragraph(result.stderr.split("etft train: error:")[-1])
        assert not (folder / "logs").exists() or not list((folder / "logs").iterdir())   # no half-made run
