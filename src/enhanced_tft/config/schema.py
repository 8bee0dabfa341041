"""One typed config tree: defaults, YAML in and out, CLI overrides, validation.

Precedence: CLI overrides (`--set section.key=value`, `--task`, ...) > YAML file > defaults.
Every user error raises ConfigError (a ValueError) naming the key, the value and what is allowed.
The error messages live in config/errors.py (the classes in errors.py), the overrides and resume rules in
config/overrides.py; both are re-exported here, so `enhanced_tft.config.schema` is the one place to import from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .. import tasks
from ..errors import ConfigError, UserError
from .errors import format_errors, quoted_value
from .overrides import SAFE_RESUME_CHANGES, apply_override, resolve_aliases, resume_changes
from .yaml_io import dump_yaml
from .yaml_io import load_yaml_text as _load

__all__ = ["FILE_COLUMNS", "MAX_SEQUENCE_LENGTH", "MAX_HORIZON", "MAX_BATCH", "MAX_LAG", "UserError", "ConfigError",
           "DataConfig", "ModelConfig", "TrainConfig", "BacktestConfig", "RunConfig", "Config", "build_config",
           "load_yaml", "apply_override", "load_config", "load_run_config", "EARLIER_DEFAULTS", "update",
           "apply_test_mode", "to_yaml", "SAFE_RESUME_CHANGES", "resume_config", "with_overrides"]

FILE_COLUMNS = ("timestamp", "symbol", "open", "high", "low", "close", "volume", "adj_close")
# upper bounds: a typo (an extra zero or three) is refused before anything is allocated
MAX_SEQUENCE_LENGTH = 100_000
MAX_HORIZON = 100_000
MAX_BATCH = 1 << 24
MAX_LAG = 1_000_000


class _Section(BaseModel):
    # strict: YAML `d_model: "64"` or `batch_size: 8.5` is an error, not a silent cast.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


class DataConfig(_Section):
    source: Literal["synthetic", "file", "sp500", "nasdaq", "frame"] = Field(
        "synthetic", description="where bars come from: the embedded generator, data.path (etft train --data PATH), "
                                 "the daily S&P 500 / NASDAQ index bars 1999-2018 shipped in the `arch` package "
                                 "(pip install 'enhanced-tft[examples]'), or frame: a pandas DataFrame given to "
                                 "enhanced_tft.api.train(config, data=frame)")
    path: str | None = Field(None, description="file: OHLCV bars as CSV, gzip CSV (.gz) or Parquet")
    columns: dict[str, str] = Field(
        {}, description="file: our column name -> the file's (timestamp, symbol, open, high, low, close, volume, "
                        "adj_close); unmapped names are looked up as they are, and `date` serves as timestamp")
    timestamp_format: str | None = Field(
        None, description="file: strftime format of the timestamps, e.g. '%Y-%m-%d %I-%p'; None = inferred")
    encoding: str = Field("utf-8", description="file: text encoding of a CSV (utf-8, latin-1, cp1252, utf-16, ...)")
    skip_rows: int = Field(0, ge=0, le=1_000_000, description="file: lines before the header (free text of some exports)")
    symbol: str | None = Field(
        None, description="file: symbol of a file without a symbol column; with one, keep only this symbol's rows")
    duplicates: Literal["error", "keep_last"] = Field(
        "error", description="file: two bars of one symbol at one timestamp: stop, or keep the later row of the file")
    missing: Literal["error", "drop"] = Field(
        "error", description="file: an empty, NaN or inf value in a used column: stop, or drop the row (logged)")
    too_short: Literal["error", "skip"] = Field(
        "error", description="a symbol with too few bars for sequence_length, horizon and the splits: stop, or skip it")
    adjust_column: str | None = Field(
        None, description="file: adjusted close column (e.g. adj_close); OHLC are multiplied by it / close first")
    extra_columns: list[str] | Literal["all"] = Field(
        [], description="file: other numeric columns passed through as observed inputs (names in the file), "
                        "or 'all' for every numeric column not used above")
    fill_gaps: int = Field(0, ge=0, le=100_000, description="fill a gap of up to this many missing bars (on the series' usual "
                                                "step and own calendar: weekends and market holidays are not gaps) "
                                                "with flat bars at the last close and zero volume; 0 = never")
    num_symbols: int = Field(5, ge=1, le=100_000, description="synthetic: number of symbols (series)")
    num_bars: int = Field(2500, ge=10, le=100_000_000, description="synthetic: bars per symbol")
    bar_minutes: int = Field(60, ge=1, le=525_600, description="synthetic: minutes per bar (calendar features)")
    num_extra_features: int = Field(0, ge=0, le=10_000, description="synthetic: extra observed inputs x_1.. (AR(1) noise "
                                                         "without signal), for feature-count benchmarks")
    sequence_length: int = Field(48, ge=2, le=MAX_SEQUENCE_LENGTH, description="bars of history in each window (the seed's key)")
    horizon: int = Field(1, ge=1, le=MAX_HORIZON, description="bars ahead the target looks")
    target: Literal["return", "volatility"] = Field(
        "return", description="regression/quantile: future log return over the horizon, or future realized "
                              "volatility (root mean square of the next `horizon` 1-bar log returns)")
    binary_dead_zone: float = Field(0.0, ge=0.0, lt=1.0, description="classification_binary: share of the "
                                    "smallest train |returns| whose samples are left out of every split (0 = none)")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="last part of each series before test")
    test_fraction: float = Field(0.15, gt=0.0, lt=1.0, description="last part of each series")
    val_start: str | None = Field(None, description="first date of validation (e.g. 2011-01-01); with test_start "
                                                   "it replaces the fractions")
    test_start: str | None = Field(None, description="first date of the test split; needs val_start")
    split: Literal["time", "per_symbol"] = Field(
        "time", description="how val_fraction and test_fraction cut the data: time = one set of cut dates for every "
                            "symbol, fractions of the pooled time span (no symbol trains on a period another is "
                            "tested on; a symbol without a training window is left out with a warning); per_symbol "
                            "= fractions of each symbol's own bars")
    walk_forward_folds: int = Field(0, ge=0, le=100, description="walk-forward validation: train this many runs, fold k "
                                    "testing on the k-th of the last test blocks with all bars before it for train "
                                    "and val (0 = one split)")
    fold: int | None = Field(None, ge=0, le=99, description="with walk_forward_folds: train only this fold (0-based); "
                                                     "None = every fold, one run folder each")
    purge_gap: int | None = Field(None, ge=0, le=1_000_000, description="bars left out between splits; None = horizon")
    memory_map_dir: str | None = Field(None, description="keep the feature array in a memory-mapped file in this "
                                                         "folder (for data larger than RAM); None = in memory")
    flat_fraction: float = Field(0.33, ge=0.0, lt=1.0,
                                 description="multiclass: share of train returns labelled flat; sets the dead zone")
    return_lags: list[int] = Field([1, 2, 3, 5, 10, 20], description="lags (bars) of the log-return features")
    volatility_windows: list[int] = Field([10, 30], description="rolling windows of the volatility features")
    volatility_features: bool | Literal["auto"] = Field(
        "auto", description="realized volatility over a day, week and month of bars and the Parkinson, Garman-Klass "
                            "and Rogers-Satchell range estimators as inputs; auto = on for data.target=volatility")

    @property
    def with_volatility_features(self) -> bool:
        """data.volatility_features resolved: auto means on for the volatility target only."""
        return self.target == "volatility" if self.volatility_features == "auto" else bool(self.volatility_features)

    @field_validator("return_lags", "volatility_windows")
    @classmethod
    def _positive_list(cls, value: list[int]) -> list[int]:
        if not value or len(value) > 1_000 or any(not 1 <= v <= MAX_LAG for v in value):
            raise ValueError(f"must be a non-empty list of at most 1000 integers in [1, {MAX_LAG}], got "
                             f"{quoted_value(value)}")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        import codecs
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError("unknown text encoding; allowed: a Python codec name such as utf-8, latin-1, cp1252, "
                             "utf-16") from None
        return value

    @field_validator("columns")
    @classmethod
    def _known_columns(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(FILE_COLUMNS))
        if unknown:
            raise ValueError(f"unknown column name(s) {', '.join(unknown)}; allowed keys: {', '.join(FILE_COLUMNS)} "
                             "(ours), each mapped to the file's column name")
        return value

    @model_validator(mode="after")
    def _file_needs_path(self) -> "DataConfig":
        if self.source == "file" and not self.path:
            raise ValueError("source='file' needs data.path, the CSV, gzip CSV or Parquet file of bars; "
                             "set data.path or use `etft train --data PATH`")
        if self.source != "file" and self.path:
            raise ValueError(f"data.path={self.path!r} is set but source={self.source!r} would ignore it; "
                             "set data.source=file (or use `etft train --data PATH`)")
        return self

    @model_validator(mode="after")
    def _fractions(self) -> "DataConfig":
        blocks = max(self.walk_forward_folds, 1)
        if self.val_fraction + blocks * self.test_fraction >= 0.9:
            folds = f" x walk_forward_folds={self.walk_forward_folds}" if self.walk_forward_folds else ""
            raise ValueError(
                f"val_fraction + test_fraction{folds} = {self.val_fraction + blocks * self.test_fraction:g} "
                "leaves under 10% for training; allowed: a sum below 0.9")
        if self.fold is not None and self.fold >= self.walk_forward_folds:
            raise ValueError(f"fold={self.fold} needs walk_forward_folds > {self.fold} (now {self.walk_forward_folds}); "
                             "folds are numbered from 0")
        if self.walk_forward_folds and self.val_start is not None:
            raise ValueError("walk_forward_folds and the date splits (val_start, test_start) exclude each other; "
                             "set one of them")
        return self

    @model_validator(mode="after")
    def _dates(self) -> "DataConfig":
        if (self.val_start is None) != (self.test_start is None):
            raise ValueError(f"val_start={self.val_start!r} and test_start={self.test_start!r}: set both dates "
                             "(splits by date) or neither (splits by val_fraction and test_fraction)")
        if self.val_start is not None:
            import pandas as pd
            parsed = []
            for key, text in (("val_start", self.val_start), ("test_start", self.test_start)):
                try:
                    parsed.append(pd.Timestamp(text))
                except (ValueError, TypeError):
                    raise ValueError(f"{key}={text!r} is not a date; allowed: a date like 2011-01-01 or "
                                     "2011-01-01 09:30") from None
            if not parsed[0] < parsed[1]:
                raise ValueError(f"val_start={self.val_start!r} is not before test_start={self.test_start!r}")
        return self

    @property
    def effective_purge_gap(self) -> int:
        return self.horizon if self.purge_gap is None else self.purge_gap


class ModelConfig(_Section):
    d_model: int = Field(64, ge=1, le=65_536, description="width of every hidden state")
    num_heads: int = Field(4, ge=1, le=1_024, description="attention heads; must divide d_model")
    num_transformer_blocks: int = Field(2, ge=1, le=1_024, description="stacked self-attention blocks")
    ff_dim: int = Field(128, ge=1, le=1_048_576, description="width of each block's feed-forward")
    dropout_rate: float = Field(0.1, ge=0.0, lt=1.0, description="dropout everywhere, in [0, 1)")
    variable_hidden_size: int = Field(16, ge=1, le=65_536, description="per-variable GRN width in variable selection")
    lstm_layers: int = Field(1, ge=1, le=64, description="layers of the LSTM encoder")
    linear_skip: bool = Field(True, description="add a linear map of the last bar's observed inputs to the head's "
                                                "output (TiDE's global residual); false: the head reads the body only")

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} does not divide d_model={self.d_model}; "
                "allowed: a num_heads that divides d_model")
        return self


class TrainConfig(_Section):
    micro_batch_size: int = Field(64, ge=1, le=MAX_BATCH, description="samples per forward/backward (older name, the "
                                  "seed's: batch_size)")
    gradient_accumulation_steps: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batches per optimizer step")
    effective_batch_size: int | None = Field(
        None, ge=1, le=MAX_BATCH, description="samples per optimizer step; if set, gradient_accumulation_steps is derived from it")
    activation_checkpointing: Literal["none", "blocks", "all"] = Field(
        "none", description="recompute activations in backward: blocks = transformer blocks, all = also selection and LSTM")
    log_every_steps: int = Field(50, ge=1, le=1_000_000_000, description="optimizer steps per logging window (loss, speed, memory)")
    checkpoint_every_steps: int = Field(100, ge=1, le=1_000_000_000, description="optimizer steps between resumable checkpoints (also at each epoch end)")
    keep_checkpoints: int = Field(2, ge=1, le=1_000, description="resumable checkpoints kept per member, newest first (the best is kept apart)")
    max_nonfinite_steps: int = Field(5, ge=1, le=1_000_000, description="consecutive NaN/inf steps (skipped) before the run stops")
    epochs: int = Field(8, ge=1, le=1_000_000, description="maximum epochs")
    learning_rate: float = Field(2e-3, gt=0.0, description="peak AdamW learning rate")
    weight_decay: float = Field(1e-2, ge=0.0, description="AdamW weight decay")
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of steps with linear warm-up")
    min_lr_ratio: float = Field(0.05, ge=0.0, le=1.0, description="cosine decay ends at this share of the peak")
    grad_clip_norm: float = Field(1.0, gt=0.0, description="gradient clipping by global norm")
    early_stopping_patience: int = Field(3, ge=1, description="epochs without val improvement before stopping")
    mixed_precision: bool | Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="auto | fp32 | fp16 | bf16; the seed's true/false still accepted")
    regression_loss: Literal["mae", "huber"] = Field("huber", description="loss of the regression task")
    huber_delta: float = Field(1.0, gt=0.0, description="Huber delta, in train-std units of the target")
    volatility_loss: Literal["qlike", "log_mse", "huber"] = Field(
        "qlike", description="data.target=volatility: qlike (QLIKE on the variance, the model predicting log "
                             "volatility), log_mse (squared error of log volatility), or huber (regression_loss on "
                             "volatility itself); quantile: qlike and log_mse fit the quantiles of log volatility")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto picks CUDA when present")
    compile: bool = Field(False, description="torch.compile the model (minutes to compile); falls back to eager, logged, if it fails")
    ensemble_size: int = Field(1, ge=1, le=1_000, description="members trained with seeds seed, seed+1, ...")
    distribute: Literal["data", "members"] = Field(
        "data", description="under torchrun: data = all ranks train each model together (each its share of every "
                            "window); members = rank r trains members (and walk-forward folds) r, r+N, ... alone")
    bootstrap: bool = Field(
        False, description="each member trains on a resample with replacement of the training windows, drawn "
                           "with its seed (more diverse members); false: every member sees every window")
    strong_baseline: bool = Field(
        True, description="after the model, fit LightGBM on the same features, splits and target (early-stopped "
                          "on val) and report it beside the model as strong_baseline (pip install "
                          "'enhanced-tft[baseline]')")
    blend: Literal["none", "strong_baseline"] = Field(
        "strong_baseline", description="strong_baseline: also report (and write as blend_*) w x model + (1 - w) x "
                                       "LightGBM, w fitted on val; needs train.strong_baseline; none: no blend")
    max_steps_per_epoch: int | None = Field(None, ge=1, le=1_000_000_000, description="cap on optimizer steps per epoch (smoke runs)")

    @model_validator(mode="before")
    @classmethod
    def _derive_accumulation(cls, raw: Any) -> Any:
        """The seed's batch_size is micro_batch_size; effective_batch_size fixes the samples per step, and
        micro_batch_size x accumulation must give exactly that."""
        raw = resolve_aliases("train", raw)
        if not isinstance(raw, dict) or raw.get("effective_batch_size") is None:
            return raw
        effective, micro = raw["effective_batch_size"], raw.get("micro_batch_size",
                                                                 cls.model_fields["micro_batch_size"].default)
        if not isinstance(effective, int) or not isinstance(micro, int) or micro < 1 or effective < 1:
            return raw   # the field validators report the bad type or value
        if effective % micro:
            raise ValueError(f"effective_batch_size={effective} is not a multiple of micro_batch_size={micro}; "
                             "allowed: an effective_batch_size that micro_batch_size divides")
        steps = effective // micro
        given = raw.get("gradient_accumulation_steps")
        if given is not None and given != steps:
            raise ValueError(f"micro_batch_size={micro} x gradient_accumulation_steps={given} = {micro * given} "
                             f"differs from effective_batch_size={effective}; set one of the two, or make them agree")
        return {**raw, "gradient_accumulation_steps": steps}

    @property
    def samples_per_step(self) -> int:
        """The effective batch: samples behind one optimizer step."""
        return self.micro_batch_size * self.gradient_accumulation_steps


class BacktestConfig(_Section):
    cost_bps: float = Field(5.0, ge=0.0, le=10_000.0, description="costs in basis points per unit of turnover "
                            "(a full switch from long to short is 2 units), charged in every backtest")
    quantile: float = Field(0.2, gt=0.0, le=0.5, description="rank backtest: long the top and short the bottom "
                            "share of the symbols at each timestamp")
    periods_per_year: float | None = Field(None, gt=0.0, le=1_000_000.0, description="bars per year, to annualise; "
                                           "None = from the timestamps (8760 for 24/7 hourly bars, ~252 for trading days)")


class RunConfig(_Section):
    log_dir: str = Field("logs", description="run folders go to LOG_DIR/training_<timestamp>")
    test_mode: bool = Field(False, description="the seed's smoke run: small data, small model, 2 epochs")
    report: bool = Field(True, description="write report.html when training ends (about a second of figures); "
                                           "false: none, `etft report --run RUN` writes it later")
    tracking: list[Literal["mlflow", "tensorboard"]] = Field([], description="also record each run in MLflow and/or "
                                                       "TensorBoard (pip install \"enhanced-tft[tracking]\")")
    mlflow_uri: str | None = Field(None, description="MLflow tracking URI; None = sqlite:///LOG_DIR/mlflow.db, artifacts in LOG_DIR/mlartifacts")
    mlflow_experiment: str = Field("enhanced_tft", min_length=1, description="MLflow experiment of the runs (created if missing)")


class Config(_Section):
    task: str = Field("classification_binary", description="one of the registered tasks (enhanced_tft.tasks): "
                                                           + ", ".join(tasks.names()))
    seed: int = Field(42, ge=0, le=2**62, description="seed of data order, initialisation and dropout")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    backtest: BacktestConfig = Field(default_factory=BacktestConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        tasks.get(value)   # raises, naming the registered tasks
        return value

    @model_validator(mode="after")
    def _target_fits_task(self) -> "Config":
        problem = tasks.get(self.task).check_data(self.data.target, self.data.binary_dead_zone)
        if problem:
            raise ValueError(problem)
        return self

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
             test_mode: bool = False) -> "Config":
        """Defaults, then the YAML file at `path`, then `overrides` ("section.key=value"), as `etft train` builds it."""
        return load_config(path, list(overrides), test_mode)


def build_config(raw: dict[str, Any]) -> Config:
    """Validate a plain dict into a Config, or raise ConfigError listing every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, Config)) from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = _load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                test_mode: bool = False) -> Config:
    """Defaults, then the YAML file, then --test_mode's sizes, then each `section.key=value` override."""
    raw: dict[str, Any] = load_yaml(path) if path else {}
    if test_mode:   # before the overrides: a user's --set wins over the smoke run's sizes
        raw = apply_test_mode(build_config(raw)).model_dump(mode="json")
    for assignment in overrides or []:
        apply_override(raw, assignment)
    return build_config(raw)


# defaults that changed: a run folder's config.yaml written before the key existed ran with the old value
EARLIER_DEFAULTS = {("data", "split"): "per_symbol", ("model", "linear_skip"): False}


def load_run_config(path: str | Path) -> Config:
    """A run folder's config.yaml, with the values its version used for keys added since (EARLIER_DEFAULTS):
    resuming or predicting an older run rebuilds the data it was trained on."""
    raw = load_yaml(path)
    for (section, key), value in EARLIER_DEFAULTS.items():
        if isinstance(raw.get(section, {}), dict) and key not in raw.get(section, {}):
            raw.setdefault(section, {})[key] = value
    return build_config(raw)


def update(cfg: Config, **sections: dict[str, Any]) -> Config:
    """Return a validated copy with some fields replaced, e.g. update(cfg, train={"epochs": 2})."""
    raw = cfg.model_dump()
    for name, values in sections.items():
        if isinstance(values, dict):
            if name == "train" and "effective_batch_size" not in values and (
                    {"micro_batch_size", "gradient_accumulation_steps"} & values.keys()):
                raw[name]["effective_batch_size"] = None   # re-derived from the new sizes
            raw[name].update(values)
        else:
            raw[name] = values
    return build_config(raw)


def apply_test_mode(cfg: Config) -> Config:
    """The seed's --test_mode: a small slice of data, a small model, two epochs; still a full run."""
    return update(
        cfg,
        data={"num_symbols": min(cfg.data.num_symbols, 3), "num_bars": min(cfg.data.num_bars, 800),
              "sequence_length": min(cfg.data.sequence_length, 24)},
        model={"d_model": 32, "num_heads": 4, "num_transformer_blocks": 1, "ff_dim": 64,
               "variable_hidden_size": 8},
        train={"epochs": 2, "micro_batch_size": min(cfg.train.micro_batch_size, 32), "gradient_accumulation_steps": 1},
        run={"test_mode": True},
    )


def to_yaml(cfg: Config) -> str:
    return dump_yaml(cfg.model_dump(mode="json"))


def resume_config(saved: Config, overrides: list[str]) -> tuple[Config, list[str]]:
    """A stopped run's config with `overrides` applied, and the keys they changed; refuses any change outside
    SAFE_RESUME_CHANGES, listing each with its old and new value."""
    cfg = with_overrides(saved, overrides)
    return cfg, resume_changes(saved.model_dump(mode="json"), cfg.model_dump(mode="json"))


def with_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """`cfg` with each "section.key=value" applied, validated again."""
    raw = cfg.model_dump(mode="json")
    for assignment in overrides:
        apply_override(raw, assignment)
    return build_config(raw)
