"""Run folders travel between users: links planted in one are refused on read and on write, a second
trainer is refused while one holds the folder, and a torn metrics line does not break the report."""
import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import run_cli
from enhanced_tft.cli import main
from enhanced_tft.errors import UserError
from enhanced_tft.runs import RunFolder, atomic_path, write_text_atomic


@pytest.fixture
def received_run(trained_run, tmp_path) -> Path:
    """A copy of a finished run, as a colleague would send it."""
    copy = tmp_path / "received"
    shutil.copytree(trained_run, copy)
    return copy


def test_a_linked_file_in_a_run_folder_is_not_read_into_the_report(received_run, tmp_path, capsys):
    secret = tmp_path / "credentials"
    secret.write_text("aws_secret_access_key = do-not-leak\n")
    (received_run / "config.yaml").unlink()
    (received_run / "config.yaml").symlink_to(secret)
    (received_run / "report.html").unlink()
    assert main(["report", "--run", str(received_run)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml' is a symbolic link" in err and "outside the folder" in err
    assert not (received_run / "report.html").exists()                    # nothing embedded anywhere


def test_a_link_where_the_report_goes_is_refused_and_its_target_untouched(received_run, tmp_path, capsys):
    target = tmp_path / "authorized_keys"
    target.write_text("ssh-ed25519 AAAA... me@host\n")
    (received_run / "report.html").unlink()
    (received_run / "report.html").symlink_to(target)
    assert main(["report", "--run", str(received_run)]) == 2
    assert "report.html' is a symbolic link" in capsys.readouterr().err
    assert target.read_text() == "ssh-ed25519 AAAA... me@host\n"


def test_planted_temporary_names_are_never_opened(tmp_path):
    target = tmp_path / "victim"
    target.write_text("keep me\n")
    for name in (".tmp.summary.json", ".summary.json.tmp"):              # the old fixed temp names
        (tmp_path / name).symlink_to(target)
    write_text_atomic(tmp_path / "summary.json", "{}\n")
    assert target.read_text() == "keep me\n" and (tmp_path / "summary.json").read_text() == "{}\n"
    with pytest.raises(RuntimeError, match="disk full"), atomic_path(tmp_path / "summary.json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert (tmp_path / "summary.json").read_text() == "{}\n"             # the good file kept
    assert sorted(p.name for p in tmp_path.iterdir()) == [".summary.json.tmp", ".tmp.summary.json", "summary.json",
                                                          "victim"]       # no temporary file left behind


def test_a_checkpoint_link_is_refused(received_run, tmp_path, capsys):
    best = received_run / "checkpoints" / "member_0_best.pt"
    moved = tmp_path / "elsewhere.pt"
    best.rename(moved)
    best.symlink_to(moved)
    assert main(["predict", "--run", str(received_run), "--out", str(tmp_path / "p.csv")]) == 2
    assert "member_0_best.pt' is a symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_a_second_trainer_in_the_same_folder_is_refused_with_the_holders_pid(received_run, tmp_path):
    import os
    with RunFolder(received_run).lock():
        result = run_cli(["-m", "enhanced_tft", "train", "--resume", str(received_run)], cwd=tmp_path, process=True)
    assert result.returncode == 2
    assert f"is in use by process {os.getpid()} (another etft train or --resume of this run)" in result.stderr
    with RunFolder(received_run).lock():                                  # released when the holder ends
        pass


def test_a_torn_last_metrics_line_is_skipped_and_a_damaged_one_named(received_run, caplog):
    path = received_run / "metrics.jsonl"
    whole = path.read_text()
    path.write_text(whole + '{"kind": "epoch", "memb')                   # a crash mid-append
    records = RunFolder(received_run).metrics_records()
    assert len(records) == len(whole.splitlines()) and "left out its torn last line" in caplog.text
    assert main(["report", "--run", str(received_run)]) == 0
    path.write_text('{"kind": "ep\n' + whole)
    with pytest.raises(UserError, match="damaged at line 1"):
        RunFolder(received_run).metrics_records()
    json.loads(whole.splitlines()[0])                                      # the fixture's records are whole


def test_spreadsheet_formulas_in_symbols_are_quoted_in_csv_output(tmp_path):
    import pandas as pd

    from enhanced_tft.runs import spreadsheet_safe
    frame = pd.DataFrame({"symbol": ["=HYPERLINK(\"http://x\")", "+cmd|' /C calc'!A0", "-2+3", "@SUM(A1)", "BTC"],
                          "value": [-1.0, 2.0, -3.0, 4.0, 5.0], "=evil": ["a", "b", "c", "d", "e"]})
    safe = spreadsheet_safe(frame)
    assert safe["symbol"].tolist() == ["'=HYPERLINK(\"http://x\")", "'+cmd|' /C calc'!A0", "'-2+3", "'@SUM(A1)", "BTC"]
    assert safe["value"].tolist() == [-1.0, 2.0, -3.0, 4.0, 5.0]           # numbers are left as numbers
    assert list(safe.columns) == ["symbol", "value", "'=evil"]
    assert frame["symbol"][0].startswith("=")                                # the caller's frame is not changed
    RunFolder(tmp_path).write_csv("x.csv", frame)
    assert "'=HYPERLINK" in (tmp_path / "x.csv").read_text() and "\n=" not in (tmp_path / "x.csv").read_text()


def test_the_report_shows_dollar_names_as_text_and_no_absolute_paths(received_run):
    import re

    from enhanced_tft.report.page import build_report
    frame = (received_run / "variable_importance_by_symbol.csv")
    symbols = json.loads((received_run / "scaler.json").read_text())["symbols"]
    frame.write_text(frame.read_text().replace(symbols[0], "US$_$X"))        # as mathtext: a ValueError
    config = received_run / "config.yaml"
    text = re.sub(r"(?m)^  log_dir: .*$", "  log_dir: /home/alice/secret_project/logs", config.read_text())
    config.write_text(re.sub(r"(?m)^  path: .*$", f"  path: {received_run.resolve().parent}/bars.csv", text))
    page = build_report(received_run)
    assert "/home/alice" not in page and str(received_run) not in page
    assert "log_dir: .../logs" in page                                      # outside the run's log folder
    assert "  path: ../bars.csv\n" in page                                   # inside it: relative to the run
    assert page.count("data:image/png;base64,") >= 4
