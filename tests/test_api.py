"""The Python API (enhanced_tft.api) as a notebook uses it: a DataFrame in, a run folder and DataFrames out."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from enhanced_tft import api
from enhanced_tft.cli import main as etft
from enhanced_tft.data.synthetic import symbol_frame

OVERRIDES = ["seed=7", "data.sequence_length=16", "model.d_model=16", "model.num_heads=2",
             "model.num_transformer_blocks=1", "model.ff_dim=32", "model.variable_hidden_size=4",
             "model.dropout_rate=0.0", "train.batch_size=32", "train.epochs=2", "train.max_steps_per_epoch=8",
             "train.strong_baseline=false"]


def _bars(num_bars: int = 700) -> pd.DataFrame:
    """Two symbols of the embedded generator, as a user's DataFrame: the timestamp as a DatetimeIndex."""
    frames = [symbol_frame(7, i, num_bars, 60).assign(symbol=f"SYM{i}") for i in range(2)]
    return pd.concat(frames).set_index("timestamp")


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow   # a training, then its ONNX export
def test_a_notebook_trains_predicts_and_evaluates_a_dataframe_writing_only_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bars = _bars()
    before = _files(tmp_path)
    cfg = api.Config.load(None, [*OVERRIDES, f"run.log_dir={json.dumps(str(tmp_path / 'logs'))}"])
    run = api.train(cfg, data=bars)

    (folder,) = (tmp_path / "logs").glob("training_*")
    assert run.path == folder
    new = _files(tmp_path) - before
    assert new and all(name.startswith(f"logs/{folder.name}/") for name in new), sorted(new)
    assert run.config.data.source == "frame" and run.config.data.path is None
    fingerprint = json.loads((folder / "data.json").read_text())
    assert fingerprint["source"] == "frame" and fingerprint["rows"] == len(bars) == 1400

    # evaluate reproduces the summary to the bit; predict gives the rows and columns predictions_test.csv holds
    assert run.evaluate()["test"] == run.summary["test"]
    own = run.predict()
    written = pd.read_csv(folder / "predictions_test.csv")
    assert list(own.columns) == list(written.columns)
    assert len(own) == len(written) == run.summary["test"]["num_samples"]
    np.testing.assert_allclose(own["p_up"].to_numpy(), written["p_up"].to_numpy(), rtol=1e-6)

    # new bars: every bar with a full window (31 warm-up bars, then windows of 16), in memory only
    after_training = _files(tmp_path)
    new_bars = _bars(800).iloc[-200:]
    predicted = run.predict(new_bars)
    assert len(predicted) == 200 - 31 - 16 + 1
    assert set(predicted["symbol"]) == {"SYM1"} and list(predicted.columns) == list(written.columns)
    assert predicted["p_up"].between(0, 1).all()
    assert _files(tmp_path) == after_training

    # served by ONNX Runtime from the run's export (RUN/onnx): the same rows, within 1e-4
    assert run.export() == folder / "onnx"
    served = run.predict(new_bars, engine="onnx")
    assert list(served.columns) == list(predicted.columns) and (served["timestamp"] == predicted["timestamp"]).all()
    assert np.abs(served["p_up"].to_numpy() - predicted["p_up"].to_numpy()).max() < 1e-4
    assert all(name.startswith(f"logs/{folder.name}/") for name in _files(tmp_path) - before)

    importance = run.importance()
    assert importance.equals(pd.read_csv(folder / "variable_importance.csv"))
    for _, group in importance.groupby("selection"):
        assert group["importance"].sum() == pytest.approx(1.0, abs=1e-4)
    attention = run.attention_by_lag()
    assert attention.equals(pd.read_csv(folder / "attention_by_lag.csv"))

    # later, from the folder: its own splits need the DataFrame again, and a changed one is refused
    reopened = api.Run.open(folder)
    with pytest.raises(api.UserError, match="was trained on a pandas DataFrame: give new data, or open the run"):
        reopened.evaluate()
    assert api.Run.open(folder, data=bars).evaluate()["test"] == run.summary["test"]
    changed = bars.copy()
    changed.iloc[100, changed.columns.get_loc("close")] *= 1.01
    with pytest.raises(api.UserError, match="changed since training .*contents differ"):
        api.Run.open(folder, data=changed).evaluate()


def test_plan_is_etft_plans_numbers(capsys):
    cfg = api.Config.load(None, OVERRIDES)
    planned = api.plan(cfg)
    assert etft(["plan", "--json", *[a for o in OVERRIDES for a in ("--set", o)]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert planned.details == printed
    assert planned.peak_bytes == printed["peak_bytes"] > 0
    assert planned.fits is None and planned.micro_batch_size is None   # no budget given
    assert str(planned).startswith("memory plan for one training step: micro-batch 32 x 1 accumulation steps")
    with pytest.raises(api.UserError, match="num_devices=0; allowed: an integer >= 1"):
        api.plan(cfg, num_devices=0)


def test_bad_input_is_refused_before_a_run_folder_is_made(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = api.Config.load(None, [*OVERRIDES, "run.log_dir=logs"])
    with pytest.raises(api.UserError, match="data must be a pandas DataFrame of bars or the path of a CSV/Parquet "
                                            "file, not list"):
        api.train(cfg, data=[1, 2, 3])
    with pytest.raises(api.UserError, match=r"the DataFrame lacks column\(s\) close; the file has 6 column"):
        api.train(cfg, data=_bars().drop(columns="close"))
    with pytest.raises(api.UserError, match="train each with data.fold=K"):
        api.train(cfg, data=_bars(), overrides=["data.walk_forward_folds=2"])
    with pytest.raises(api.UserError, match="config must be a Config, the path of a YAML file or None, not int"):
        api.train(3)
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_the_command_line_says_a_dataframe_source_is_for_python(tmp_path, capsys):
    code = etft(["train", "--set", "data.source=frame", "--log_dir", str(tmp_path / "logs"), "--test_mode"])
    assert code == 2
    assert "data.source=frame: the bars are a pandas DataFrame given in Python" in capsys.readouterr().err
    assert not any((tmp_path / "logs").glob("training_*"))
