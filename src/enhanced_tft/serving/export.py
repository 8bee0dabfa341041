"""`etft export`: a finished run's members as ONNX files with a dynamic batch dimension, beside the run's fitted
transform (scaler.json) and config and a manifest.json that lists them with their SHA-256, for serving without
torch (serving/onnx_model.py) and for `etft predict --engine onnx`.

Each member is exported as served: the model in eval mode (no dropout, no activation checkpointing, the plain
autograd path of variable selection rather than its hand-written autograd Function) with its task's `predict`
on top (sigmoid, softmax, sorted quantiles or the value itself), in float32. The ONNX output is thus what the
torch engine's members give, and both engines share everything after it (data/tables.py).

The graph is traced once (torch.onnx.export, the dynamo exporter): every member is that graph with its own
weights, since before optimisation its initializers are the state dict's tensors one to one; an ensemble of M
costs one trace (the slow part, tens of seconds), not M. Each member file is run by ONNX Runtime on a check
batch against torch before the manifest is written, last: a folder without a manifest is no export, so a failed
export never leaves one that looks valid.

Legend: B batch, T sequence_length, L = T + H, F features, O head outputs.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..data.rows import RowArrays
from ..data.tables import table_batches
from ..errors import ExportMismatch, UserError
from ..model.layers import set_fast_cpu_kernels
from ..model.tft import set_activation_checkpointing
from ..runs import CONFIG_YAML, MANIFEST_JSON, ONNX_EXPORT, SCALER_JSON, atomic_path, refuse_link, write_json_atomic
from ..tasks import Task
from .onnx_model import INPUT_NAMES, MANIFEST_FORMAT, OUTPUT_NAME, sha256_of
from .saved_run import SavedRun

log = logging.getLogger(__name__)

CHECK_TOLERANCE = 1e-4   # max |ONNX Runtime - torch| on the check batch, in the units of the task's prediction
TRACE_BATCH, CHECK_BATCH = 2, 3   # the check runs another batch size than the trace: the batch axis is dynamic


class _Served(nn.Module):
    """One member as served: observed (B, T, F_obs), known (B, L, F_known), symbol (B,) -> task.predict (B,) or
    (B, O)."""

    def __init__(self, model: nn.Module, task: Task):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, observed: torch.Tensor, known: torch.Tensor, symbol: torch.Tensor) -> torch.Tensor:
        return self.task.predict(self.model(observed, known, symbol).output)


def export_run(run_path: str | Path, out_dir: str | Path | None = None, overwrite: bool = False) -> Path:
    """Export the run's members, transform, config and manifest into `out_dir` (default RUN/onnx); return it."""
    _require_exporter()
    run = SavedRun.open(run_path)
    out = Path(out_dir) if out_dir is not None else run.path / ONNX_EXPORT
    _refuse_existing(out, overwrite)
    started = time.time()
    served = [_Served(_plain_eval(model), run.task).eval() for model in run.load_models(torch.device("cpu"))]
    _clear_for_export(out)   # only once the members loaded: a run that cannot be exported keeps its old export
    program = _trace_program(served[0], _example_inputs(run, TRACE_BATCH, seed=0))
    base = program.model_proto   # the unoptimised graph: each member's starting point
    check_inputs = _example_inputs(run, CHECK_BATCH, seed=1)
    digests, differences, predictions = {}, [], []
    for member, module in enumerate(served):
        name = f"member_{member}.onnx"
        digests[name] = _write_member(program, base, module, out / name)
        difference, prediction = _check((out / name).read_bytes(), digests[name], module, check_inputs)
        differences.append(difference)
        predictions.append(prediction)
        log.info("member %d of %d: %s (%.2f MB); max |ONNX Runtime - torch| %.2g on a check batch", member + 1,
                 len(served), name, (out / name).stat().st_size / 2**20, difference)
    for name in (SCALER_JSON, CONFIG_YAML):   # what serving reads beside the members, as trained
        data = run.folder.file(name).read_bytes()
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
        digests[name] = sha256_of(data)
    write_json_atomic(out / MANIFEST_JSON, _manifest(run, program, digests, len(served), predictions,
                                                     max(differences)))
    log.info("exported %d member(s) of %s to %s in %.1f s", len(served), run.path, out, time.time() - started)
    return out


def _require_exporter() -> None:
    import importlib.util
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"etft export needs {', '.join(missing)}: pip install 'enhanced-tft[onnx]'")


def _refuse_existing(out: Path, overwrite: bool) -> None:
    """An existing export is replaced only with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file; give a folder (created if needed)")
    if refuse_link(out / MANIFEST_JSON).exists() and not overwrite:
        raise UserError(f"--out {str(out)!r} already holds an export ({MANIFEST_JSON}); give another --out, or add "
                        "--overwrite to replace it")


def _clear_for_export(out: Path) -> None:
    """Take an old export's manifest away first (the folder is no export until the new one is written), then the
    files it listed; create the folder."""
    manifest = refuse_link(out / MANIFEST_JSON)
    if manifest.exists():
        try:
            listed = list(json.loads(manifest.read_text()).get("sha256", {}))
        except (OSError, ValueError, AttributeError):
            listed = []
        manifest.unlink()
        for name in listed:
            if isinstance(name, str) and Path(name).name == name and (out / name).is_file():
                refuse_link(out / name).unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"--out {str(out)!r} cannot be created: {err.strerror}") from None


def _plain_eval(model: nn.Module) -> nn.Module:
    """The path that exports: no checkpointing, plain autograd ops in variable selection (the same function)."""
    return set_fast_cpu_kernels(set_activation_checkpointing(model, "none"), False).eval()


def _example_inputs(run: SavedRun, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of the shapes the model takes: scaled features ~ N(0, 1), calendar values in [-1, 1], symbol ids."""
    transform = run.transform
    length, horizon = transform.sequence_length, transform.horizon
    generator = torch.Generator().manual_seed(seed)
    observed = torch.randn(batch, length, len(transform.features), generator=generator)
    known = torch.rand(batch, length + horizon, len(transform.known_features), generator=generator) * 2 - 1
    symbol = torch.randint(0, len(transform.symbols), (batch,), generator=generator)
    return observed, known, symbol


@contextlib.contextmanager
def _quiet():
    """The exporter's own chatter (deprecation notes, a missing torchvision, folding notes) is not the user's."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _trace_program(module: _Served, inputs: tuple[torch.Tensor, ...]):
    """The unoptimised ONNX program of `module` with a dynamic batch axis on every input."""
    batch = torch.export.Dim("batch")
    with _quiet(), torch.no_grad():
        return torch.onnx.export(module, inputs, input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                 dynamic_shapes={name: {0: batch} for name in INPUT_NAMES}, dynamo=True,
                                 optimize=False, verbose=False)


def _write_member(program, base, module: _Served, path: Path) -> str:
    """`module`'s weights in the traced graph, optimised, written to `path` (atomically); returns its SHA-256."""
    program.model = _with_weights(base, module)
    with _quiet():
        program.optimize()   # constant folding and fusions, as torch.onnx.export(optimize=True) does
    for node in program.model.graph.all_nodes():
        # the exporter's notes per node (source paths of this machine, stack traces): most of a small file
        node.metadata_props.clear()
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)
        digest = sha256_of(tmp.read_bytes())
    return digest


def _with_weights(base, module: _Served):
    """The traced graph `base` (an ONNX ModelProto) as an onnx_ir Model holding `module`'s weights."""
    import onnx_ir as ir
    model = ir.serde.deserialize_model(base)
    state = {name: tensor.detach().contiguous().numpy() for name, tensor in module.state_dict().items()}
    initializers = model.graph.initializers
    missing = sorted(set(state) - set(initializers))
    if missing:
        raise ExportMismatch(f"the traced graph has no initializer for {', '.join(missing[:5])}: members cannot "
                             "share it; this is a bug in Enhanced TFT's export, please report it")
    for name, array in state.items():
        if tuple(initializers[name].shape) != array.shape:
            raise ExportMismatch(f"initializer {name} has shape {tuple(initializers[name].shape)}, the weight "
                                 f"{array.shape}: this is a bug in Enhanced TFT's export, please report it")
        initializers[name].const_value = ir.Tensor(array.copy(), name=name)
    return model


def _check(data: bytes, digest: str, module: _Served, inputs: tuple[torch.Tensor, ...]) -> tuple[float, np.ndarray]:
    """Max |ONNX Runtime - torch| of one written member (`data`, which must hash to `digest`) on the check batch,
    and its ONNX prediction."""
    import onnxruntime as ort
    if sha256_of(data) != digest:
        raise ExportMismatch("an exported member changed on disk while the export ran; export again")
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], dict(zip(INPUT_NAMES, (x.numpy() for x in inputs))))[0]
    with torch.no_grad():
        expected = module(*inputs).numpy()
    difference = float(np.abs(got - expected).max()) if got.shape == expected.shape else float("inf")
    if not difference <= CHECK_TOLERANCE:
        raise ExportMismatch(f"the exported graph differs from the torch model by {difference:.3g} on a check batch "
                             f"(shapes {got.shape} and {expected.shape}; allowed {CHECK_TOLERANCE:g}): this is a "
                             "bug in Enhanced TFT's export, please report it with the run's config.yaml")
    return difference, got


def _table_columns(transform, predictions: list[np.ndarray]) -> list[str]:
    """The columns `etft predict` writes for this run, as the shared table code names them (one sample)."""
    one = RowArrays(observed=np.zeros((1, len(transform.features)), np.float32),
                    known=np.zeros((1, len(transform.known_features)), np.float32), target=np.zeros(1, np.float32),
                    raw_return=np.zeros(1, np.float32), symbol=np.zeros(1, np.int64), timestamp=np.zeros(1, np.int64))
    (columns,) = table_batches(one, np.zeros(1, np.int64), None, transform,
                               [(np.zeros(1, np.int64), [p[:1] for p in predictions])])
    return list(columns)


def _manifest(run: SavedRun, program, digests: dict[str, str], num_members: int, predictions: list[np.ndarray],
              difference: float) -> dict:
    import onnx
    import onnxruntime
    import onnxscript

    transform, task = run.transform, run.task
    length, horizon = transform.sequence_length, transform.horizon
    opset = next((v for domain, v in program.model.opset_imports.items() if domain == ""), None)
    return {
        "format": MANIFEST_FORMAT,
        "run": str(run.path.resolve()),
        "task": task.name, "target": transform.target,
        "features": transform.features, "known_features": transform.known_features, "symbols": transform.symbols,
        "sequence_length": length, "horizon": horizon,
        "inputs": {"observed": ["batch", length, len(transform.features)],
                   "known": ["batch", length + horizon, len(transform.known_features)], "symbol": ["batch"]},
        "output": {"name": OUTPUT_NAME, "columns": list(task.columns), "probabilities": task.probabilities},
        "table_columns": _table_columns(transform, predictions),
        "members": [f"member_{m}.onnx" for m in range(num_members)],
        "transform": SCALER_JSON, "config": CONFIG_YAML,
        "transform_sha256": transform.sha256(),
        "sha256": digests,
        "check": {"max_abs_difference": difference, "tolerance": CHECK_TOLERANCE, "batch": CHECK_BATCH},
        "versions": {"enhanced_tft": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
                     "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__, "opset": opset},
    }
