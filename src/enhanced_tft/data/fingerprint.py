"""What a run was trained on, in a few numbers: the data file's size, modification time and SHA-256 of its
contents, or the generator's settings for synthetic data. Saved in the run folder when training starts;
resume and predict compare it with the data they are given, so that a changed file is never taken for
the one the run started with.
"""
from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..config.schema import Config
from ..errors import UserError
from .sources import example_config

log = logging.getLogger(__name__)

HASH_BLOCK = 1 << 20
SYNTHETIC_KEYS = ("num_symbols", "num_bars", "bar_minutes", "num_extra_features")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(HASH_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def frame_sha256(bars) -> str:
    """SHA-256 of a DataFrame's columns and values (pandas' row hashes, index left out)."""
    import pandas as pd
    digest = hashlib.sha256(json.dumps([str(c) for c in bars.columns]).encode())
    digest.update(pd.util.hash_pandas_object(bars, index=False).to_numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(cfg: Config, bars=None) -> dict:
    """The fingerprint of `cfg.data`'s bars (a file's size, mtime and content hash; the generator's settings;
    the checked bars of a DataFrame, `bars`, given to the Python API)."""
    data = cfg.data
    if data.source == "frame":
        if bars is None:
            raise UserError("this run was trained on a pandas DataFrame (data.source=frame), which only Python can "
                            "give again: enhanced_tft.api.Run.open(RUN, data=frame), or api.resume(RUN, data=frame)")
        return {"source": "frame", "rows": len(bars), "symbols": int(bars["symbol"].nunique()),
                "sha256": frame_sha256(bars)}
    if data.source == "synthetic":
        settings = {"seed": cfg.seed, **{key: getattr(data, key) for key in SYNTHETIC_KEYS}}
        text = json.dumps(settings, sort_keys=True)
        return {"source": "synthetic", "settings": settings, "sha256": hashlib.sha256(text.encode()).hexdigest()}
    if data.source == "file":
        path = Path(data.path).expanduser()
    else:
        path = Path(example_config(data).path)
    try:
        stat = path.stat()
        digest = file_sha256(path)
    except OSError as err:
        raise UserError(f"data file {str(path)!r} cannot be read ({err.strerror}); allowed: the file the run was "
                        "trained on, at its path in config.yaml (data.path)") from None
    return {"source": data.source, "path": str(path.resolve()), "size": stat.st_size,
            "modified": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(timespec="seconds"),
            "sha256": digest}


def differences(saved: dict, now: dict) -> list[str]:
    """How the data now differs from the fingerprint saved at training, in words; [] when the contents match
    (a file only touched, or copied to the same path with a new modification time, is the same data)."""
    if saved.get("sha256") == now.get("sha256"):
        return []
    out = []
    if saved.get("source") != now.get("source"):
        out.append(f"source {saved.get('source')!r} at training, {now.get('source')!r} now")
    if "settings" in saved or "settings" in now:
        before, after = saved.get("settings", {}), now.get("settings", {})
        out += [f"{key} {before.get(key)!r} at training, {after.get(key)!r} now"
                for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    for key, label in (("size", "size in bytes"), ("modified", "modified"), ("rows", "bars")):
        if key in saved and saved.get(key) != now.get(key):
            out.append(f"{label} {saved[key]} at training, {now.get(key)} now")
    out.append(f"contents differ (SHA-256 {str(saved.get('sha256'))[:12]}... at training, "
               f"{str(now.get('sha256'))[:12]}... now)")
    return out


def describe(fingerprint: dict) -> str:
    if fingerprint.get("source") == "frame":
        return f"the DataFrame it was trained on ({fingerprint.get('rows')} bars of {fingerprint.get('symbols')} symbol(s))"
    if fingerprint.get("source") == "synthetic":
        return "the synthetic data (" + ", ".join(f"{k} {v}" for k, v in fingerprint["settings"].items()) + ")"
    return (f"data file {fingerprint.get('path')!r} ({fingerprint.get('size')} bytes, modified "
            f"{fingerprint.get('modified')})")


def modified_but_same(saved: dict, now: dict) -> bool:
    """Same contents under a new modification time (touched, copied back): worth a note, not a refusal."""
    return saved.get("sha256") == now.get("sha256") and saved.get("modified") != now.get("modified")


def check_unchanged(saved: dict, cfg: Config, allow_changed: bool, refusal: Callable[[str, str], str],
                    going_on: str, bars=None) -> None:
    """The data `cfg` reads now against the fingerprint saved at training (resume, predict of the run's own data):
    the same contents go on (a new modification time alone is logged); a change is refused with
    `refusal(the differences, what the data was)` unless `allow_changed`, and then logged after `going_on`."""
    now = data_fingerprint(cfg, bars)
    changed = differences(saved, now)
    if modified_but_same(saved, now):
        log.info("the data file was modified (%s) but its contents are those the run started with", now.get("modified"))
    if changed and not allow_changed:
        raise UserError(refusal("; ".join(changed), describe(saved)))
    if changed:
        log.warning("%s (--allow-changed-data): %s", going_on, "; ".join(changed))
