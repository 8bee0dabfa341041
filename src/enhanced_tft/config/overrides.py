"""Changes to a config after its YAML: `--set section.key=value` overrides, and which changes a resumed run allows."""
from __future__ import annotations

from typing import Any

import yaml

from ..errors import ConfigError
from .yaml_io import load_yaml_text as _load

# older names still accepted, in YAML files and --set alike: the seed's `batch_size` is the micro-batch
KEY_ALIASES = {"train.batch_size": "train.micro_batch_size"}


def canonical_key(key: str) -> str:
    """The config key `key` names (itself, or the key an accepted older name stands for)."""
    return KEY_ALIASES.get(key, key)


def resolve_aliases(section: str, raw: Any) -> Any:
    """A section's raw mapping with older key names replaced by their keys; both at once must agree."""
    if not isinstance(raw, dict):
        return raw
    out = dict(raw)
    for alias, key in KEY_ALIASES.items():
        alias_section, alias_name = alias.split(".")
        key_name = key.split(".")[1]
        if alias_section != section or alias_name not in out:
            continue
        value = out.pop(alias_name)
        if key_name in out and out[key_name] != value:
            raise ConfigError(f"{alias}={value!r} and {key}={out[key_name]!r} are the same setting ({alias_name} is "
                              f"the older name of {key_name}); give one of them")
        out[key_name] = value
    return out


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` override in place; the value is parsed as YAML (64, 0.1, true, [1, 2])."""
    key, sep, text = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {assignment!r} must look like section.key=value, e.g. model.d_model=64")
    parts = canonical_key(key.strip()).split(".")
    try:
        value = _load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is a value, not a section")
        node = child
    for alias, canonical in KEY_ALIASES.items():   # the override replaces the setting, whichever name held it
        if canonical == ".".join(parts):
            node.pop(alias.split(".")[-1], None)
    node[parts[-1]] = value


# what may change when a stopped run resumes: nothing that would change what was trained
SAFE_RESUME_CHANGES = ("train.epochs", "train.early_stopping_patience", "train.log_every_steps", "train.distribute",
                       "train.checkpoint_every_steps", "train.keep_checkpoints", "train.max_nonfinite_steps",
                       "train.strong_baseline", "train.blend", "backtest.cost_bps", "backtest.quantile", "backtest.periods_per_year",
                       "run.tracking", "run.mlflow_uri", "run.mlflow_experiment", "run.report")   # tracking: a resume continues or replays


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "columns":
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resume_changes(saved: dict, resumed: dict) -> list[str]:
    """The keys in which two dumped configs differ; refuses any change outside SAFE_RESUME_CHANGES, listing each
    with its old and new value."""
    before, after = flatten(saved), flatten(resumed)
    changed = [k for k in after if before.get(k) != after[k]]
    unsafe = [k for k in changed if k not in SAFE_RESUME_CHANGES]
    if unsafe:
        listing = "; ".join(f"{k}: {before.get(k)!r} -> {after[k]!r}" for k in unsafe)
        raise ConfigError(f"--resume: the config differs from the run's in a way that would change what was "
                          f"trained ({listing}); allowed changes: {', '.join(SAFE_RESUME_CHANGES)}")
    return changed
