"""One class per task: what it learns from the returns, its loss, its prediction, its output columns, its
metrics, its naive baseline and what the report shows. Nothing else in the package branches on a task's name:
the rest asks the task object (`tasks.get(name)` for the class, `tasks.for_config(cfg)` for an instance).

A new task is a subclass registered with `register`; the config accepts its name from then on.
torch is imported inside the methods: the config validates task names before anything heavy is loaded.

Legend: B batch, O head outputs, M members, N samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:   # pragma: no cover
    import torch

QUANTILES = (0.1, 0.5, 0.9)
SPLIT_STATS = ("num_samples", "up_rate", "majority_rate")   # properties of the data, not of a model


VOL_FLOOR = 1e-6   # volatilities are floored here before a log (a flat stretch has zero realized volatility)


@dataclass(frozen=True)
class TargetScale:
    """How the model's scaled output maps back to the raw target: raw = scaled * std + mean, or with `log`
    (log volatility learned) raw = exp(scaled * std + mean)."""
    std: float = 1.0
    mean: float = 0.0
    log: bool = False

    def to_raw(self, scaled):
        """Scaled values (torch or numpy) -> the raw target's units."""
        value = scaled * self.std + self.mean
        return value.exp() if self.log and hasattr(value, "exp") else np.exp(value) if self.log else value

    def from_raw(self, raw: np.ndarray) -> np.ndarray:
        """Raw target values (numpy) -> what the model learns."""
        value = np.log(np.maximum(raw, VOL_FLOOR)) if self.log else raw
        return (value - self.mean) / self.std


def volatility_metrics(forecast, actual) -> dict[str, float]:
    """QLIKE on the variance, mean(RV^2 / s^2 - log(RV^2 / s^2) - 1) (0 for a perfect forecast; Patton 2011), and
    the mean squared error of log volatility, for volatility forecasts `forecast` of realized volatilities `actual`
    (torch tensors or numpy arrays, floored at VOL_FLOOR)."""
    forecast = np.maximum(np.asarray(forecast, np.float64), VOL_FLOOR)
    actual = np.maximum(np.asarray(actual, np.float64), VOL_FLOOR)
    log_ratio = 2.0 * (np.log(actual) - np.log(forecast))          # log(RV^2 / s^2)
    return {"qlike": float(np.mean(np.exp(log_ratio) - log_ratio - 1.0)),
            "mse_log": float(np.mean((log_ratio / 2.0) ** 2))}


class Task:
    """The behaviour of one task. Subclasses set the class attributes and the methods marked below."""
    name: ClassVar[str]
    columns: ClassVar[tuple[str, ...]]        # prediction columns, in the head's output order
    probabilities: ClassVar[bool]             # columns are probabilities (classifiers), else raw target values
    targets: ClassVar[tuple[str, ...]] = ("return",)   # data.target values this task can learn
    uses_binary_dead_zone: ClassVar[bool] = False      # data.binary_dead_zone applies
    main_metric: ClassVar[str]                # the report's headline metric (learning curves, ensemble spread)
    spread: ClassVar[tuple[str, str]]         # (column, label) of the members' disagreement in the report

    def __init__(self, target: str = "return", regression_loss: str = "huber", huber_delta: float = 1.0,
                 volatility_loss: str = "huber"):
        self.target, self.regression_loss, self.huber_delta = target, regression_loss, huber_delta
        self.volatility_loss = volatility_loss

    @property
    def log_target(self) -> bool:
        """The model learns log volatility (train.volatility_loss qlike or log_mse on the volatility target)."""
        return self.target == "volatility" and not self.probabilities and self.volatility_loss in ("qlike", "log_mse")

    @property
    def output_size(self) -> int:
        return len(self.columns)

    # ---------------------------------------------------------------- what each task defines

    def make_targets(self, forward_target: np.ndarray, forward_return: np.ndarray, target_scale: TargetScale,
                     dead_zone: float) -> np.ndarray:
        """What the model learns per row (float32), from the raw forward target and forward return."""
        raise NotImplementedError

    def loss(self, output_BO: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (B,) in float32; the trainer sums and normalises them."""
        raise NotImplementedError

    def predict(self, output_BO: torch.Tensor) -> torch.Tensor:
        """Raw head output -> what users read: (B,) or (B, O), scaled values or probabilities."""
        raise NotImplementedError

    def metrics(self, prediction: torch.Tensor, target: torch.Tensor, raw: torch.Tensor,
                scale: TargetScale) -> dict[str, float]:
        """prediction as `predict` returns it; target as the task's labels; raw the raw target in its units."""
        raise NotImplementedError

    def baseline(self, train_target: torch.Tensor, train_raw: torch.Tensor, scale: TargetScale) -> torch.Tensor:
        """The naive rule's constant prediction, fitted on the train split: shape () or (O,)."""
        raise NotImplementedError

    def prediction_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample losses (N,) of predictions as `predict` gives them (not raw head outputs): what a blend
        of two forecasters' predictions is fitted to (evaluation/blend.py). A proper scoring rule of the task."""
        raise NotImplementedError

    def baseline_rule(self) -> str:
        raise NotImplementedError

    def hard_class(self, mean_BO: np.ndarray) -> np.ndarray | None:
        """The predicted class per sample (classifiers), else None; `mean_BO` is the ensemble mean (numpy)."""
        return None

    def split_note(self, metrics: dict) -> str:
        """A sentence about the split itself (class balance), or ''."""
        return ""

    def data_notes(self, transform: dict) -> list[tuple[str, str]]:
        """Rows the report's data section adds for this task, from scaler.json."""
        return []

    # ---------------------------------------------------------------- shared behaviour

    @classmethod
    def check_data(cls, target: str, binary_dead_zone: float) -> str | None:
        """Why this task cannot learn with these data settings, or None."""
        if target not in cls.targets:
            able = [name for name, task in REGISTRY.items() if target in task.targets]
            return f"data.target={target!r} needs task {' or '.join(able)}, not {cls.name!r}"
        if binary_dead_zone and not cls.uses_binary_dead_zone:
            able = [name for name, task in REGISTRY.items() if task.uses_binary_dead_zone]
            return (f"data.binary_dead_zone={binary_dead_zone:g} applies to task {' or '.join(able)} only, "
                    f"not {cls.name!r}; set it to 0")
        return None

    def prediction_columns(self, member_predictions_MB: list, scale: TargetScale,
                           with_members: bool = True) -> dict[str, np.ndarray]:
        """Columns of one batch: ensemble mean per output, the class, the members' spread (std), each member.

        Members' predictions as `predict` gives them, CPU tensors or numpy arrays alike (the ONNX engine's): numpy
        does the rest, so that both engines' tables come from this one function. Probabilities stay probabilities;
        values are in the raw target's units (output x train std + train mean).
        """
        stacked_MBO = member_stack(member_predictions_MB)
        if stacked_MBO.ndim == 2:
            stacked_MBO = stacked_MBO[:, :, None]
        mean_BO = ensemble_mean(stacked_MBO)
        if scale.log and not self.probabilities:   # log volatility learned: columns in volatility units
            return self._log_columns(stacked_MBO, mean_BO, scale, with_members and len(member_predictions_MB) > 1)
        spread_BO = stacked_MBO.std(axis=0)   # population std: 0 for a single member
        # Python floats: numpy keeps float32 (a numpy float64 would promote the columns)
        factor, shift = (1.0, 0.0) if self.probabilities else (float(scale.std), float(scale.mean))
        columns: dict[str, np.ndarray] = {}
        for j, name in enumerate(self.columns):
            columns[name] = mean_BO[:, j] * factor + shift   # the order of `metrics`: same float32 result
        hard = self.hard_class(mean_BO)
        if hard is not None:
            columns["class"] = np.asarray(hard).astype(np.int8)
        for j, name in enumerate(self.columns):
            columns[f"{name}_spread"] = spread_BO[:, j] * factor
        if with_members and len(member_predictions_MB) > 1:
            for m in range(stacked_MBO.shape[0]):
                for j, name in enumerate(self.columns):
                    columns[f"member_{m}_{name}"] = stacked_MBO[m, :, j] * factor + shift
        return columns

    def _log_columns(self, stacked_MBO: np.ndarray, mean_BO: np.ndarray, scale: TargetScale,
                     with_members: bool) -> dict[str, np.ndarray]:
        """prediction_columns of a log-volatility model: exp of the ensemble's mean log (what `metrics` scores),
        the spread of the members' volatilities."""
        members_MBO = scale.to_raw(stacked_MBO.astype(np.float64)).astype(np.float32)
        columns: dict[str, np.ndarray] = {}
        for j, name in enumerate(self.columns):
            columns[name] = scale.to_raw(mean_BO[:, j].astype(np.float64)).astype(np.float32)
        for j, name in enumerate(self.columns):
            columns[f"{name}_spread"] = members_MBO[:, :, j].std(axis=0)
        if with_members:
            for m in range(stacked_MBO.shape[0]):
                for j, name in enumerate(self.columns):
                    columns[f"member_{m}_{name}"] = members_MBO[m, :, j]
        return columns


def member_stack(member_predictions_M: list) -> np.ndarray:
    """Members' predictions, each (B,) or (B, O) as CPU tensors or numpy arrays -> (M, B) or (M, B, O) float32."""
    return np.stack([np.asarray(p, dtype=np.float32) for p in member_predictions_M])


def ensemble_mean(stacked_M: np.ndarray) -> np.ndarray:
    """The ensemble's prediction, the members' mean over the first axis in float32: the one mean that both the
    metrics (evaluation.score) and the written columns (prediction_columns) take, so they agree to the bit."""
    return stacked_M.mean(axis=0, dtype=np.float32)


def _recall_and_auc(hard, labels, num_classes: int, scores) -> tuple[float, float]:
    from torchmetrics.functional.classification import binary_auroc, multiclass_auroc, multiclass_recall
    recall = float(multiclass_recall(hard, labels, num_classes=max(num_classes, 2), average="macro"))
    if num_classes == 2:
        return recall, float(binary_auroc(scores, labels))
    return recall, float(multiclass_auroc(scores, labels, num_classes=num_classes, average="macro"))


class BinaryClassification(Task):
    name = "classification_binary"
    columns = ("p_up",)
    probabilities = True
    uses_binary_dead_zone = True
    main_metric = "auc"
    spread = ("p_up_spread", "std of the members' P(up)")

    def make_targets(self, forward_target, forward_return, target_scale, dead_zone):
        return (forward_return > 0).astype(np.float32)

    def loss(self, output_BO, target_B):
        import torch.nn.functional as F
        return F.binary_cross_entropy_with_logits(output_BO.float()[:, 0], target_B, reduction="none")

    def predict(self, output_BO):
        import torch
        return torch.sigmoid(output_BO.float()[:, 0])

    def metrics(self, prediction, target, raw, scale):
        prediction, labels = prediction.float().cpu(), target.float().cpu().long()
        hard = (prediction > 0.5).long()
        balanced, auc = _recall_and_auc(hard, labels, 2, prediction)
        up = labels.float().mean()
        return {"accuracy": float((hard == labels).float().mean()), "balanced_accuracy": balanced, "auc": auc,
                "up_rate": float(up), "majority_rate": float(max(up, 1 - up)), "num_samples": int(labels.numel())}

    def baseline(self, train_target, train_raw, scale):
        import torch
        majority = float(train_target.float().mean() > 0.5)
        # probability just off 0.5 towards the majority: accuracy = majority rate, AUC = 0.5
        return torch.tensor(0.5 + (majority - 0.5) * 1e-3)

    def baseline_rule(self):
        return "majority class of the train split"

    def prediction_loss(self, prediction, target):   # log loss of P(up)
        import torch.nn.functional as F
        return F.binary_cross_entropy(prediction.float().clamp(1e-7, 1 - 1e-7), target.float(), reduction="none")

    def hard_class(self, mean_BO):
        return mean_BO[:, 0] > 0.5

    def split_note(self, metrics):
        return f"{metrics['up_rate']:.1%} up bars, majority-class rate {metrics['majority_rate']:.1%}"


class MulticlassClassification(Task):
    name = "classification_multiclass"
    columns = ("p_down", "p_flat", "p_up")
    probabilities = True
    main_metric = "auc"
    spread = ("p_up_spread", "std of the members' P(up)")

    def make_targets(self, forward_target, forward_return, target_scale, dead_zone):
        return np.where(forward_return > dead_zone, 2, np.where(forward_return < -dead_zone, 0, 1)).astype(np.float32)

    def loss(self, output_BO, target_B):
        import torch.nn.functional as F
        return F.cross_entropy(output_BO.float(), target_B.long(), reduction="none")

    def predict(self, output_BO):
        import torch
        return torch.softmax(output_BO.float(), dim=1)

    def metrics(self, prediction, target, raw, scale):
        prediction, labels = prediction.float().cpu(), target.float().cpu().long()
        hard = prediction.argmax(dim=1)
        balanced, auc = _recall_and_auc(hard, labels, 3, prediction)
        return {"accuracy": float((hard == labels).float().mean()), "balanced_accuracy": balanced, "auc": auc,
                "num_samples": int(labels.numel())}

    def baseline(self, train_target, train_raw, scale):
        import torch
        freq = torch.bincount(train_target.long(), minlength=3).float()
        return freq / freq.sum()

    def baseline_rule(self):
        return "class frequencies of the train split"

    def prediction_loss(self, prediction, target):   # log loss of the true class's probability
        import torch
        chosen = prediction.float().gather(1, target.long().unsqueeze(1))[:, 0]
        return -torch.log(chosen.clamp_min(1e-7))

    def hard_class(self, mean_BO):
        return mean_BO.argmax(axis=1)

    def data_notes(self, transform):
        return [("flat class: |log return| at most", f"{transform['dead_zone']:.6f}")] if "dead_zone" in transform else []


class _TargetValues(Task):
    """Tasks that predict the target itself (return or volatility), centred and scaled by its train moments."""
    probabilities = False
    targets = ("return", "volatility")

    def make_targets(self, forward_target, forward_return, target_scale, dead_zone):
        if target_scale.log:
            return target_scale.from_raw(forward_target.astype(np.float64)).astype(np.float32)
        return ((forward_target - target_scale.mean) / target_scale.std).astype(np.float32)

    def prediction_loss(self, prediction, target):
        """Squared error of the scaled value, whatever the training loss; for a log target (qlike, log_mse) that
        is the squared error of log volatility."""
        return (prediction.float() - target.float()) ** 2

    def volatility_loss_of(self, prediction_B, target_B):
        """qlike or log_mse per sample on log volatility (prediction and target in log units, centred alike):
        QLIKE = RV^2 / s^2 - log(RV^2 / s^2) - 1 with log(RV^2 / s^2) = 2 (target - prediction)."""
        if self.volatility_loss == "log_mse":
            return (prediction_B - target_B).pow(2)
        log_ratio = (2.0 * (target_B - prediction_B)).clamp(max=30.0)   # exp(30): far beyond any real ratio
        return log_ratio.exp() - log_ratio - 1.0


class Regression(_TargetValues):
    name = "regression"
    columns = ("value",)
    main_metric = "mae"
    spread = ("value_spread", "std of the members' predicted log return")

    def loss(self, output_BO, target_B):
        import torch.nn.functional as F
        prediction = output_BO.float()[:, 0]
        if self.log_target:
            return self.volatility_loss_of(prediction, target_B)
        if self.regression_loss == "mae":
            return (prediction - target_B).abs()
        return F.huber_loss(prediction, target_B, reduction="none", delta=self.huber_delta)

    def predict(self, output_BO):
        return output_BO.float()[:, 0]

    def metrics(self, prediction, target, raw, scale):
        value = scale.to_raw(prediction.float().cpu())
        raw = raw.float().cpu()
        error = value - raw
        out = {"mae": float(error.abs().mean()), "rmse": float(error.pow(2).mean().sqrt())}
        if self.target == "return":
            out["direction_accuracy"] = float(((value > 0) == (raw > 0)).float().mean())
        else:
            out.update(volatility_metrics(value.numpy(), raw.numpy()))
        return {**out, "num_samples": int(raw.numel())}

    def baseline(self, train_target, train_raw, scale):
        import torch
        return torch.tensor(0.0)   # in scaled units: the train mean of the target (0 for returns)

    def baseline_rule(self):
        if self.log_target:
            return "train mean of log volatility (its exp: the geometric mean)"
        return "train mean of the volatility target" if self.target == "volatility" else "zero return"


class QuantileRegression(_TargetValues):
    name = "quantile"
    columns = tuple(f"p{round(q * 100)}" for q in QUANTILES)
    main_metric = "quantile_loss"
    spread = ("p50_spread", "std of the members' predicted median log return")

    def loss(self, output_BO, target_B):
        import torch
        quantiles = torch.tensor(QUANTILES, device=output_BO.device)
        error = target_B.unsqueeze(1) - output_BO.float()                                     # (B, Q)
        return torch.maximum(quantiles * error, (quantiles - 1) * error).mean(dim=1)

    def predict(self, output_BO):
        return output_BO.float().sort(dim=1).values   # keeps P10 <= P50 <= P90

    def prediction_loss(self, prediction, target):   # the mean pinball loss, as in training
        return self.loss(prediction, target)

    def metrics(self, prediction, target, raw, scale):
        import torch
        quantiles = torch.tensor(QUANTILES)
        raw = raw.float().cpu()
        values = scale.to_raw(prediction.float().cpu())                                      # (N, Q)
        error = raw.unsqueeze(1) - values
        pinball = torch.maximum(quantiles * error, (quantiles - 1) * error)
        inside = (raw >= values[:, 0]) & (raw <= values[:, -1])
        out = {"quantile_loss": float(pinball.mean()), "coverage_p10_p90": float(inside.float().mean()),
               "mae_p50": float((values[:, 1] - raw).abs().mean())}
        if self.target == "volatility":   # the median as the point forecast
            out.update(volatility_metrics(values[:, 1].numpy(), raw.numpy()))
        return {**out, "num_samples": int(raw.numel())}

    def baseline(self, train_target, train_raw, scale):
        import torch
        levels = torch.tensor(QUANTILES, dtype=torch.float64)
        if scale.log:
            return torch.from_numpy(scale.from_raw(torch.quantile(train_raw.double(), levels).numpy())).float()
        return (torch.quantile(train_raw.double(), levels).float() - scale.mean) / scale.std

    def baseline_rule(self):
        return "unconditional train quantiles"


REGISTRY: dict[str, type[Task]] = {}


def register(task: type[Task]) -> type[Task]:
    """Make a task class known by its name (usable as a decorator); the config accepts the name from then on."""
    if not getattr(task, "name", None) or not getattr(task, "columns", None):
        raise TypeError(f"{task.__name__} needs a `name` and its `columns`")
    REGISTRY[task.name] = task
    return task


for _builtin in (Regression, QuantileRegression, BinaryClassification, MulticlassClassification):
    register(_builtin)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> type[Task]:
    """The class of a task name; an unknown name names the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; allowed: {', '.join(map(repr, REGISTRY))}") from None


def for_config(cfg) -> Task:
    """The task a validated Config trains, with its loss settings and target."""
    return get(cfg.task)(cfg.data.target, cfg.train.regression_loss, cfg.train.huber_delta, cfg.train.volatility_loss)


def for_transform(transform) -> Task:
    """The task of a saved run's transform (scaler.json): what prediction and scoring need."""
    return get(transform.task)(transform.target)
