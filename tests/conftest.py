import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Hypothesis: by default (and in CI) the same examples every run, so that a red run is reproducible from its
# log; HYPOTHESIS_PROFILE=dev tries new examples each time (and remembers failures in .hypothesis/).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
DEV_EXAMPLES = 5   # HYPOTHESIS_PROFILE=dev draws this many times each test's examples


def examples(ci: int) -> int:
    """A property test's number of examples: `ci` by default (and in CI), DEV_EXAMPLES times more under dev."""
    return ci * (DEV_EXAMPLES if os.environ.get("HYPOTHESIS_PROFILE") == "dev" else 1)

# ETFT_TEST_THREADS=1 keeps a test run from oversubscribing a machine that is busy with other work
torch.set_num_threads(int(os.environ.get("ETFT_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture
def small_raw() -> dict:
    """A config small enough for behaviour tests of a few seconds."""
    return {
        "seed": 7,
        "data": {"num_symbols": 2, "num_bars": 700, "sequence_length": 16},
        "model": {"d_model": 16, "num_heads": 2, "num_transformer_blocks": 1, "ff_dim": 32,
                  "variable_hidden_size": 4, "dropout_rate": 0.0},
        "train": {"micro_batch_size": 32, "epochs": 2},
    }


ETFT_MODULES = (["-m", "enhanced_tft.cli"], ["-m", "enhanced_tft"])


def run_cli(args: list[str], cwd: Path, timeout: int = 300, process: bool = False):
    """Run a real command line with the project's interpreter; `etft` itself (`-m enhanced_tft[.cli] ...`) runs
    its own main() in this process unless `process` (what `etft` runs, without the seconds of a new interpreter
    importing torch); anything else (a script, `-c`) in a subprocess. Returns returncode, stdout and stderr."""
    import subprocess

    if not process and args[:2] in ETFT_MODULES:
        return _run_here(lambda: _etft_main(args[2:]), ["etft", *args[2:]], cwd)
    if not process and args and args[0] == str(SEED_SCRIPT):   # the seed's script forwards to etft train
        return _run_here(lambda: _seed_script(args[1:]), args, cwd)
    # the caller's PYTHONPATH stays after ours (a package installed beside the environment, say)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p))
    if "ETFT_TEST_THREADS" in os.environ:
        env["OMP_NUM_THREADS"] = os.environ["ETFT_TEST_THREADS"]
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


SEED_SCRIPT = REPO / "train_universal_transformer_v2.py"


def _etft_main(argv: list[str]) -> int:
    from enhanced_tft.cli import main
    return main(argv)


def _seed_script(argv: list[str]) -> int:
    """The seed's script as `python train_universal_transformer_v2.py ARGV` runs it (it exits with etft's code)."""
    import runpy
    saved = sys.argv
    sys.argv = [str(SEED_SCRIPT), *argv]
    try:
        runpy.run_path(str(SEED_SCRIPT), run_name="__main__")
    finally:
        sys.argv = saved
    return 0


def _run_here(command, args: list[str], cwd: Path):
    """command() in this process, in `cwd`, with stdout and stderr captured; its exit code (or SystemExit's)."""
    import contextlib
    import io
    import subprocess

    out, err = io.StringIO(), io.StringIO()
    before, threads = os.getcwd(), torch.get_num_threads()
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = command()
            except SystemExit as stop:   # argparse's usage errors, the script's sys.exit
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    finally:
        os.chdir(before)
        torch.set_num_threads(threads)   # the command sized them for itself
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session", autouse=True)
def traces_once():
    """The memory plan's traces are a pure function of their arguments (no real tensor, no RNG draw that
    reaches the caller): every test shares them instead of tracing the same model again."""
    from enhanced_tft.training import planner
    cache = {}
    original = planner.trace_step

    def cached(cfg, dims, micro_batch, precision, checkpointing):
        key = (cfg.model_dump_json(), repr(dims), micro_batch, precision, checkpointing)
        if key not in cache:
            cache[key] = original(cfg, dims, micro_batch, precision, checkpointing)
        return cache[key]
    planner.trace_step = cached
    yield
    planner.trace_step = original


SMALL_RUN_YAML = """
seed: 7
data: {num_symbols: 2, num_bars: 700, sequence_length: 16}
model: {d_model: 16, num_heads: 2, num_transformer_blocks: 1, ff_dim: 32, variable_hidden_size: 4, dropout_rate: 0.0}
train: {micro_batch_size: 32, epochs: 2, max_steps_per_epoch: 8, log_every_steps: 4, ensemble_size: 2}
"""


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One small binary-classification run of two members through the real CLI, shared by the tests that read it."""
    folder = tmp_path_factory.mktemp("trained_run")
    (folder / "small.yaml").write_text(SMALL_RUN_YAML)
    result = run_cli(["-m", "enhanced_tft.cli", "train", "--config", "small.yaml", "--log_dir", str(folder / "logs")],
                     cwd=folder)
    assert result.returncode == 0, result.stderr
    (run,) = (folder / "logs").glob("training_*")
    return run


@pytest.fixture
def inject_faults(monkeypatch):
    """install(hook): hook(phase, step, index, indices) runs at every fault point of this test's trainings and
    inference loops (runtime/faults.py), and may raise there; removed after the test."""
    from enhanced_tft.runtime import faults

    def install(hook):
        monkeypatch.setattr(faults, "hook", hook)
        return hook
    return install


def training_model(cfg, data):
    """The model `etft train` builds for this config and data (its task's head, its checkpointing policy)."""
    from enhanced_tft import tasks
    from enhanced_tft.model.build import build_training_model, dims_for
    return build_training_model(cfg, tasks.for_config(cfg), dims_for(data.transform))


def pytest_collection_modifyitems(items):
    """`cli` marks every test that runs the real command line (in this process or a subprocess): the marker
    follows what the test does instead of a list that could go stale."""
    import inspect
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function) if function else ""
        except (OSError, TypeError):
            source = ""
        if any(call in source for call in ("run_cli(", "main([", "_etft(", "_limited(")):
            item.add_marker(pytest.mark.cli)
