"""etft export and the ONNX engine: every task's exported members predict what torch predicts (same rows, same
columns, within 1e-4), a process that cannot import torch serves a CSV file with the same numbers, and the
refusals (no export yet, an export already there, a file that does not match its SHA-256) say what to do."""
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import run_cli
from enhanced_tft.cli import main
from enhanced_tft.data.synthetic import generate_bars

TOLERANCE = 1e-4   # max |ONNX Runtime - torch| on every prediction column (float32 graphs of the same weights)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def assert_same_table(torch_frame: pd.DataFrame, onnx_frame: pd.DataFrame, probability_columns: list[str]) -> None:
    """Same columns, dtypes and rows; floats within TOLERANCE (NaN where the other has NaN); the class the same
    except where the ensemble's two likeliest classes are within the tolerance of each other."""
    assert list(onnx_frame.columns) == list(torch_frame.columns)
    assert onnx_frame.dtypes.equals(torch_frame.dtypes) and len(onnx_frame) == len(torch_frame) > 0
    for column in torch_frame.columns:
        expected, got = torch_frame[column].to_numpy(), onnx_frame[column].to_numpy()
        if column == "class":
            probabilities = torch_frame[probability_columns].to_numpy()
            if probabilities.shape[1] == 1:
                probabilities = np.concatenate([1 - probabilities, probabilities], axis=1)
            top_two = np.sort(probabilities, axis=1)[:, -2:]
            near_tie = top_two[:, 1] - top_two[:, 0] <= 2 * TOLERANCE
            assert not ((expected != got) & ~near_tie).any()
        elif expected.dtype.kind == "f":
            assert (np.isnan(expected) == np.isnan(got)).all(), column
            assert np.nanmax(np.abs(expected - got), initial=0.0) <= TOLERANCE, column
        else:
            assert (expected == got).all(), column


def _probability_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in ("p_down", "p_flat", "p_up") if c in frame] if "class" in frame else []


def _predict_both_engines(run: Path, folder: Path, *extra: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    for engine in ("torch", "onnx"):
        assert main(["predict", "--run", str(run), "--engine", engine, "--out", str(folder / f"{engine}.parquet"),
                     *extra]) == 0
    return pd.read_parquet(folder / "torch.parquet"), pd.read_parquet(folder / "onnx.parquet")


@pytest.fixture(scope="module")
def exported_run(trained_run: Path, tmp_path_factory) -> Path:
    """A copy of the two-member binary run of conftest, exported to RUN/onnx through the real CLI."""
    run = tmp_path_factory.mktemp("exported") / trained_run.name
    shutil.copytree(trained_run, run)
    assert main(["export", "--run", str(run)]) == 0
    return run


def test_the_export_holds_what_its_manifest_says(exported_run: Path, tmp_path: Path):
    folder = exported_run / "onnx"
    manifest = json.loads((folder / "manifest.json").read_text())
    scaler = json.loads((exported_run / "scaler.json").read_text())
    assert manifest["members"] == ["member_0.onnx", "member_1.onnx"]
    assert (manifest["task"], manifest["features"], manifest["symbols"]) == (scaler["task"], scaler["features"],
                                                                             scaler["symbols"])
    assert (manifest["sequence_length"], manifest["horizon"]) == (16, 1)
    assert manifest["inputs"]["observed"] == ["batch", 16, len(scaler["features"])]
    assert set(manifest["sha256"]) == {"member_0.onnx", "member_1.onnx", "scaler.json", "config.yaml"}
    for name, digest in manifest["sha256"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == digest
    assert (folder / "scaler.json").read_bytes() == (exported_run / "scaler.json").read_bytes()
    assert set(manifest["versions"]) >= {"enhanced_tft", "torch", "onnx", "opset"}
    assert manifest["check"]["max_abs_difference"] <= TOLERANCE

    torch_frame, onnx_frame = _predict_both_engines(exported_run, tmp_path)
    assert manifest["table_columns"] == list(torch_frame.columns)
    assert_same_table(torch_frame, onnx_frame, ["p_up"])                       # the test split, two members


def test_a_process_without_torch_serves_a_csv_file_as_the_torch_engine_predicts_it(exported_run: Path,
                                                                                   tmp_path: Path):
    generate_bars(2, 120, seed=11).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", "--run", str(exported_run), "--data", str(tmp_path / "new.csv"), "--out",
                 str(tmp_path / "torch.parquet")]) == 0
    script = f"""
import sys
sys.modules["torch"] = None   # any import of torch now fails
from enhanced_tft.serving.onnx_model import OnnxModel
model = OnnxModel.open({str(exported_run / "onnx")!r})
model.predict("new.csv", batch_size=50).to_parquet("served.parquet")
print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
"""
    result = run_cli(["-c", script], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['torch']"                                # only the blocked entry itself
    torch_frame, served = pd.read_parquet(tmp_path / "torch.parquet"), pd.read_parquet(tmp_path / "served.parquet")
    assert len(served) == 2 * (120 - 31 - 16 + 1)                             # a window ending at every bar
    assert served.actual.isna().sum() == 2                                    # the last bar's outcome is unknown
    assert_same_table(torch_frame, served, ["p_up"])


def test_refusals_say_what_to_do(trained_run: Path, exported_run: Path, tmp_path: Path, capsys):
    assert main(["predict", "--run", str(trained_run), "--engine", "onnx", "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert f"holds no ONNX export (no manifest.json): run `etft export --run {trained_run}` first" in err
    assert not (tmp_path / "p.parquet").exists()

    manifest = exported_run / "onnx" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    assert main(["export", "--run", str(exported_run)]) == 2
    assert ("already holds an export (manifest.json); give another --out, or add --overwrite to replace it"
            in capsys.readouterr().err)
    assert manifest.stat().st_mtime_ns == before

    changed = tmp_path / "changed"
    shutil.copytree(exported_run, changed)
    member = changed / "onnx" / "member_1.onnx"
    member.write_bytes(member.read_bytes().replace(b"member", b"MEMBER", 1) + b"\0")
    assert main(["predict", "--run", str(changed), "--engine", "onnx", "--out", str(tmp_path / "p.parquet")]) == 2
    err = capsys.readouterr().err
    assert "member_1.onnx' does not match the SHA-256 in manifest.json" in err
    assert f"export again: `etft export --run {changed} --overwrite`" in err and not (tmp_path / "p.parquet").exists()


# regression once, on the volatility target (the same graph as on returns; its table's `actual` differs)
TASKS = [("regression", "volatility"), ("quantile", "return"), ("classification_multiclass", "return")]


@pytest.mark.slow
@pytest.mark.parametrize("task, target", TASKS)
def test_onnx_predicts_what_torch_predicts_for_every_task(task, target, tmp_path, capsys):
    """Each task's head and `predict` (value, sorted quantiles, softmax; the binary one above) through the export:
    the test split's table from `etft predict --engine onnx` is torch's within the tolerance."""
    # no LightGBM baseline: it would take most of the time and is not exported
    assert main(["train", "--test_mode", "--task", task, "--log_dir", str(tmp_path / "logs"), "--set",
                 f"data.target={target}", "--set", "train.max_steps_per_epoch=4", "--set", "data.num_bars=400",
                 "--set", "train.epochs=1", "--set", "train.strong_baseline=false", "--set", "run.report=false"]) == 0
    (run,) = (tmp_path / "logs").glob("training_*")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "export")]) == 0
    shutil.move(tmp_path / "export", run / "onnx")                            # an export folder can move
    torch_frame, onnx_frame = _predict_both_engines(run, tmp_path)
    assert_same_table(torch_frame, onnx_frame, _probability_columns(torch_frame))
    manifest = json.loads((run / "onnx" / "manifest.json").read_text())
    assert (manifest["task"], manifest["target"]) == (task, target)
    assert manifest["table_columns"] == list(torch_frame.columns)
