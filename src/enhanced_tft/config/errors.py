"""The errors a user must fix, and how a config that fails validation reads as one of them.

UserError is any bad input (config, flags, files, checkpoints); ConfigError is a bad config value. A pydantic
ValidationError becomes one ConfigError message of one line per key: the key as written in YAML, the value
(cut short) and what is allowed. The root model (config.Config) is passed in: this module sits below config.py.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


def _clean_loc(loc: tuple, root: type[BaseModel]) -> str:
    """Drop pydantic's union-member tags (bool, literal[...], int) so that the key reads as in YAML."""
    parts: list[str] = []
    cls: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            parts.append(str(part))
            continue
        if cls is not None and part in cls.model_fields:
            parts.append(part)
            annotation = cls.model_fields[part].annotation
            cls = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        elif cls is not None:     # an unknown key
            parts.append(part)
            cls = None
    return ".".join(parts) or "(top level)"


def quoted_value(value: Any, limit: int = 120) -> str:
    """repr of a rejected value, cut to `limit` characters: a message never repeats a huge input in full."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def format_errors(err: ValidationError, root: type[BaseModel]) -> str:
    merged: dict[str, list[str]] = {}
    for item in err.errors():
        loc = _clean_loc(item["loc"], root)
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            parent = _section_of(item["loc"][:-1], root)
            allowed = ", ".join(sorted(parent.model_fields)) if parent else ""
            key = f"{loc}: unknown key"
            msg = f"allowed keys here: {allowed}"
        else:
            # a section-level check (input is the whole section) names its keys in the message itself
            shown = "input" in item and not isinstance(item["input"], dict)
            key = f"{loc}={quoted_value(item['input'])}" if shown else loc
        merged.setdefault(key, []).append(msg)
    lines = [f"{key}: {'; or '.join(msgs)}" for key, msgs in merged.items()]
    return "invalid config:\n  " + "\n  ".join(lines)


def _section_of(loc: tuple, root: type[BaseModel]) -> type[BaseModel] | None:
    cls: type[BaseModel] = root
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls
