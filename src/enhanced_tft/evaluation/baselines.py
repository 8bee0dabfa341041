"""The strong baseline: LightGBM on the model's features, splits and target, early-stopped on the val split.

Does the TFT beat a gradient-boosted tree that sees the last few bars? Each sample becomes one row: the
observed features of its last `lags` bars, the calendar of its last bar and of the bar `horizon` ahead (known
in advance) and its symbol (categorical). The boosters' raw scores are laid out as the model's head outputs
(logits for classifiers, scaled values or quantiles for regression), so the task's own `predict` and `metrics`
score them exactly as they score the model.

lightgbm is an optional extra (pip install 'enhanced-tft[baseline]'), imported only when a baseline is fitted.

Legend: N samples, K feature columns, O head outputs, F observed features per bar.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .. import tasks
from ..config.schema import Config
from ..data.pipeline import DataBundle
from ..data.windows import WindowSet
from ..errors import UserError
from ..runtime.threads import available_cpus

log = logging.getLogger(__name__)

BLOCK_ROWS = 65_536   # samples gathered at once: the temporary (block, lags, F) array stays a few MB
SYMBOL_COLUMN = "symbol"


@dataclass(frozen=True)
class LightGBMSettings:
    """What the boosters are trained with; the defaults suit noisy market targets from thousands of rows up."""
    max_trees: int = 2000                 # per booster; early stopping usually ends far sooner
    early_stopping_rounds: int = 50       # trees without a better val loss before stopping
    learning_rate: float = 0.05
    num_leaves: int = 31
    feature_fraction: float = 0.8
    bagging_fraction: float = 0.8         # rows per tree, redrawn every tree
    max_train_rows: int = 2_000_000       # the most recent train (and val) samples kept: bounds host RAM
    num_threads: int | None = None        # None: every CPU this process may use (more than that spin-wait)

    def min_data_in_leaf(self, num_train_rows: int) -> int:
        # noisy targets need large leaves; 20 (LightGBM's default) for small data, up to 1000 for millions of rows
        return int(np.clip(num_train_rows // 1000, 20, 1000))


# ---------------------------------------------------------------- features

def feature_names(observed_names: list[str], known_names: list[str], lags: int, horizon: int) -> list[str]:
    """Column names of `baseline_features`, in its column order."""
    return ([f"{name}@t-{lag}" for name in observed_names for lag in range(lags)]
            + [f"{name}@t-0" for name in known_names] + [f"{name}@t+{horizon}" for name in known_names]
            + [SYMBOL_COLUMN])


def baseline_features(windows: WindowSet, lags: int, observed_names: list[str] | None = None,
                      known_names: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """(N, K) float32 rows of the samples of `windows` and their K column names.

    Per sample: each observed feature at the last bar and the `lags - 1` bars before it (feature-major:
    ret_1@t-0, ret_1@t-1, ..., ret_2@t-0, ...), the known (calendar) features of the last bar and of the bar
    `horizon` ahead, then the symbol id. Gathered by blocks of samples with fancy indexing.
    """
    if not 1 <= lags <= windows.sequence_length:
        raise ValueError(f"lags={lags} must lie in [1, sequence_length={windows.sequence_length}]: the baseline "
                         "sees no bar the model's window does not hold")
    observed_NF = windows.arrays.observed.numpy()
    known_NF = windows.arrays.known.numpy()
    symbol_N = windows.arrays.symbol.numpy()
    num_observed, num_known = observed_NF.shape[1], known_NF.shape[1]
    names = feature_names(observed_names or [f"observed_{j}" for j in range(num_observed)],
                          known_names or [f"known_{j}" for j in range(num_known)], lags, windows.horizon)
    assert len(names) == num_observed * lags + 2 * num_known + 1, "names do not match the arrays' widths"
    ends_N = windows.sample_ends.numpy()
    lag_offsets = -np.arange(lags)                                                    # (lags,): 0, -1, ...
    out_NK = np.empty((len(ends_N), len(names)), np.float32)
    known_at = num_observed * lags
    for lo in range(0, len(ends_N), BLOCK_ROWS):
        ends = ends_N[lo:lo + BLOCK_ROWS]
        block = slice(lo, lo + len(ends))
        past_BLF = np.take(observed_NF, (ends[:, None] + lag_offsets).reshape(-1), axis=0).reshape(len(ends), lags, -1)
        out_NK[block, :known_at] = past_BLF.transpose(0, 2, 1).reshape(len(ends), -1)   # feature-major
        out_NK[block, known_at:known_at + num_known] = np.take(known_NF, ends, axis=0)
        out_NK[block, known_at + num_known:-1] = np.take(known_NF, ends + windows.horizon, axis=0)
        out_NK[block, -1] = np.take(symbol_N, ends)
    return out_NK, names


def most_recent(windows: WindowSet, max_rows: int) -> WindowSet:
    """The `max_rows` samples with the latest last bars (by timestamp, else by row), in their original order."""
    if len(windows) <= max_rows:
        return windows
    ends = windows.sample_ends.numpy()
    timestamps = windows.arrays.timestamp
    when = ends if timestamps is None else timestamps.numpy()[ends]
    keep = np.sort(np.argsort(when, kind="stable")[len(ends) - max_rows:])
    return windows.subset(torch.from_numpy(keep))


# ---------------------------------------------------------------- tasks -> boosters

BoosterParams = Callable[[tasks.Task], list[dict[str, Any]]]


def _binary(task: tasks.Task) -> list[dict[str, Any]]:
    return [{"objective": "binary"}]                       # raw score = logit: sigmoid gives P(up)


def _multiclass(task: tasks.Task) -> list[dict[str, Any]]:
    return [{"objective": "multiclass", "num_class": task.output_size}]   # raw scores = logits: softmax


def _regression(task: tasks.Task) -> list[dict[str, Any]]:
    # the model's own loss on the same scaled target (Huber's delta is in train-std units there too)
    if task.log_target:   # log volatility: squared error of the log (LightGBM has no QLIKE)
        return [{"objective": "l2"}]
    if task.regression_loss == "mae":
        return [{"objective": "l1"}]
    return [{"objective": "huber", "alpha": task.huber_delta}]


def _quantiles(task: tasks.Task) -> list[dict[str, Any]]:
    return [{"objective": "quantile", "alpha": q} for q in tasks.QUANTILES]   # the task's predict sorts them


# One booster per listed parameter set; their raw scores side by side are the head's outputs (N, O).
# A task registered elsewhere adds its entry here, or is skipped (logged) and training goes on.
BOOSTERS: dict[type[tasks.Task], BoosterParams] = {
    tasks.BinaryClassification: _binary, tasks.MulticlassClassification: _multiclass,
    tasks.Regression: _regression, tasks.QuantileRegression: _quantiles,
}


def booster_params(task: tasks.Task) -> list[dict[str, Any]] | None:
    """The objective of each booster for `task` (its class or nearest registered base class), or None."""
    for cls in type(task).__mro__:
        if cls in BOOSTERS:
            return BOOSTERS[cls](task)
    return None


def _import_lightgbm():
    try:
        import lightgbm
    except ImportError:
        raise UserError("the strong baseline needs LightGBM, which is not installed: pip install "
                        "'enhanced-tft[baseline]', or set train.strong_baseline=false to train without it") from None
    return lightgbm


# ---------------------------------------------------------------- fit

@dataclass
class StrongBaseline:
    """A fitted LightGBM baseline: its predictions as the model gives them, and how it was fitted."""
    task: str
    output_val: torch.Tensor         # (N_val, O) as the model's head gives them: logits, scaled values, quantiles
    output_test: torch.Tensor        # (N_test, O)
    prediction_val: torch.Tensor     # task.predict(output_val): what task.metrics and evaluation.score take
    prediction_test: torch.Tensor
    metrics: dict[str, float]        # task.metrics on the test split
    val_metrics: dict[str, float]
    best_iterations: list[int]       # one per booster (quantile: one per level)
    feature_names: list[str]
    num_train_rows: int              # rows trained on (after max_train_rows)
    num_train_rows_available: int    # train samples of the split
    fit_seconds: float
    importances: list[tuple[str, float]]   # (feature, share of the total gain), largest first, top 20
    settings: dict[str, Any] = field(default_factory=dict)
    boosters: list[str] = field(default_factory=list, repr=False)   # LightGBM's text model of each booster

    def saved(self) -> dict[str, Any]:
        """What strong_baseline.json keeps so that `etft evaluate` can apply the same boosters to other data."""
        return {"task": self.task, "lags": self.settings["lags"], "feature_names": self.feature_names,
                "boosters": self.boosters, "lightgbm": self.settings.get("lightgbm")}

    @property
    def num_features(self) -> int:
        return len(self.feature_names)

    @property
    def best_iteration(self) -> int | list[int]:
        return self.best_iterations[0] if len(self.best_iterations) == 1 else list(self.best_iterations)

    def to_summary(self) -> dict[str, Any]:
        """What summary.json keeps (plain JSON types)."""
        return {"model": "LightGBM", "task": self.task, "test": _plain(self.metrics), "val": _plain(self.val_metrics),
                "best_iteration": self.best_iteration, "num_features": self.num_features,
                "num_train_rows": self.num_train_rows, "num_train_rows_available": self.num_train_rows_available,
                "fit_seconds": round(self.fit_seconds, 3),
                "importances": [{"feature": name, "gain_share": round(share, 6)} for name, share in self.importances[:10]],
                "settings": _plain(self.settings)}


def _plain(record: dict) -> dict:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}


def _labels(windows: WindowSet) -> np.ndarray:
    return windows.outcomes()[0].numpy()


def _outputs(boosters: list, features_NK: np.ndarray) -> np.ndarray:
    """(N, O) float32: the boosters' raw scores at their best iterations, side by side."""
    scores = [booster.predict(features_NK, raw_score=True, num_iteration=booster.best_iteration)
              for booster in boosters]
    return np.concatenate([s.reshape(len(features_NK), -1) for s in scores], axis=1).astype(np.float32)


def _outputs_by_block(boosters: list, windows: WindowSet, lags: int) -> np.ndarray:
    """As `_outputs`, gathering the features block by block: the split's whole matrix never exists at once."""
    blocks = []
    for lo in range(0, len(windows), BLOCK_ROWS):
        part = windows.subset(torch.arange(lo, min(lo + BLOCK_ROWS, len(windows))))
        blocks.append(_outputs(boosters, baseline_features(part, lags)[0]))
    return np.concatenate(blocks)


def fit_strong_baseline(cfg: Config, task: tasks.Task, data: DataBundle, lags: int = 5, seed: int | None = None,
                        settings: LightGBMSettings = LightGBMSettings(),
                        log: logging.Logger = log) -> StrongBaseline | None:
    """Fit LightGBM on the train split, early-stopped on val, and score it on test like the model.

    None (logged) when the task's outputs are not something LightGBM boosters can produce: the baseline
    never stops a training run. Without lightgbm installed: UserError saying how to install it or turn it off.
    """
    params = booster_params(task)
    if params is None:
        log.warning("strong baseline skipped: task %r (%s) has no LightGBM mapping in %s.BOOSTERS", cfg.task,
                    type(task).__name__, __name__)
        return None
    lightgbm = _import_lightgbm()
    started = time.perf_counter()
    seed = cfg.seed if seed is None else seed
    train_all, val, test = (data.splits[s] for s in ("train", "val", "test"))
    if lags > train_all.sequence_length:
        log.info("strong baseline: lags=%d capped at sequence_length=%d", lags, train_all.sequence_length)
        lags = train_all.sequence_length
    train = most_recent(train_all, settings.max_train_rows)
    if len(train) < len(train_all):
        log.info("strong baseline: trains on the %d most recent of %d train samples (max_train_rows)",
                 len(train), len(train_all))
    val_fit = most_recent(val, settings.max_train_rows)   # val's whole matrix is held for early stopping too
    if len(val_fit) < len(val):
        log.info("strong baseline: early-stops on the %d most recent of %d val samples (max_train_rows)",
                 len(val_fit), len(val))

    train_NK, names = baseline_features(train, lags, data.observed_names, data.known_names)
    val_NK, _ = baseline_features(val_fit, lags, data.observed_names, data.known_names)
    shared = {
        "learning_rate": settings.learning_rate, "num_leaves": settings.num_leaves,
        "min_data_in_leaf": settings.min_data_in_leaf(len(train)), "feature_fraction": settings.feature_fraction,
        "bagging_fraction": settings.bagging_fraction, "bagging_freq": 1, "seed": seed, "deterministic": True,
        "force_row_wise": True, "num_threads": settings.num_threads or available_cpus(), "verbose": -1,
    }
    dataset_params = {"verbose": -1, "min_data_in_leaf": shared["min_data_in_leaf"]}
    train_set = lightgbm.Dataset(train_NK, _labels(train), feature_name=names, categorical_feature=[SYMBOL_COLUMN],
                                 params=dataset_params, free_raw_data=True)
    val_set = lightgbm.Dataset(val_NK, _labels(val_fit), reference=train_set, params=dataset_params)
    boosters = []
    for objective in params:
        boosters.append(lightgbm.train(
            {**shared, **objective}, train_set, num_boost_round=settings.max_trees, valid_sets=[val_set],
            callbacks=[lightgbm.early_stopping(settings.early_stopping_rounds, first_metric_only=True, verbose=False)]))
    for booster in boosters:
        booster.free_dataset()   # the binned train matrix is not needed to predict
    del train_NK, train_set

    output_val = (_outputs(boosters, val_NK) if len(val_fit) == len(val) else _outputs_by_block(boosters, val, lags))
    del val_NK, val_set
    output_test = _outputs_by_block(boosters, test, lags)
    if output_test.shape[1] != task.output_size:
        log.warning("strong baseline skipped: its boosters give %d outputs, task %r's head has %d",
                    output_test.shape[1], cfg.task, task.output_size)
        return None
    output_val_t, output_test_t = torch.from_numpy(output_val), torch.from_numpy(output_test)
    prediction_val, prediction_test = task.predict(output_val_t), task.predict(output_test_t)
    scale = data.target_scale()
    split_metrics = {name: task.metrics(prediction, *split.outcomes(), scale)
                     for name, split, prediction in (("val", val, prediction_val), ("test", test, prediction_test))}
    gain = np.sum([b.feature_importance("gain", iteration=b.best_iteration) for b in boosters], axis=0)
    order = np.argsort(-gain, kind="stable")[:20]
    importances = [(names[j], float(gain[j] / gain.sum()) if gain.sum() > 0 else 0.0) for j in order]
    result = StrongBaseline(
        task=cfg.task, output_val=output_val_t, output_test=output_test_t, prediction_val=prediction_val,
        prediction_test=prediction_test, metrics=split_metrics["test"], val_metrics=split_metrics["val"],
        best_iterations=[int(b.best_iteration) for b in boosters], feature_names=names, num_train_rows=len(train),
        num_train_rows_available=len(train_all), fit_seconds=time.perf_counter() - started, importances=importances,
        boosters=[b.model_to_string(num_iteration=b.best_iteration) for b in boosters],
        settings={**asdict(settings), "lags": lags, "min_data_in_leaf": shared["min_data_in_leaf"],
                  "num_threads": shared["num_threads"], "seed": seed,
                  "objectives": [p["objective"] for p in params], "lightgbm": lightgbm.__version__})
    log.info("strong baseline (LightGBM): %d features, %d train rows, best iteration %s, %.1f s; test: %s",
             result.num_features, result.num_train_rows, result.best_iteration, result.fit_seconds,
             "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.metrics.items()))
    return result


def predict_saved(saved: dict[str, Any], task: tasks.Task, windows: WindowSet) -> torch.Tensor:
    """The saved boosters (StrongBaseline.saved) applied to `windows`: predictions as task.metrics takes them.
    LightGBM's text format is parsed, never unpickled; a file whose features do not fit is refused."""
    lightgbm = _import_lightgbm()
    lags = saved.get("lags")
    if not isinstance(lags, int) or not 1 <= lags <= windows.sequence_length or not saved.get("boosters"):
        raise UserError(f"the saved strong baseline does not fit this run (lags={lags!r}, "
                        f"{len(saved.get('boosters') or [])} booster(s)); retrain with train.strong_baseline=true")
    try:
        boosters = [lightgbm.Booster(model_str=text) for text in saved["boosters"]]
    except lightgbm.basic.LightGBMError as err:
        raise UserError(f"the saved strong baseline cannot be read ({str(err)[:200]})") from None
    arrays = windows.arrays
    width = arrays.observed.shape[1] * lags + 2 * arrays.known.shape[1] + 1
    if any(b.num_feature() != width for b in boosters) or len(saved.get("feature_names", [])) != width:
        raise UserError(f"the saved strong baseline expects {boosters[0].num_feature()} features, this data gives "
                        f"{width}; it does not belong to this run")
    return task.predict(torch.from_numpy(_outputs_by_block(boosters, windows, lags)))
