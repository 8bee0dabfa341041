"""A built DataBundle in files that several processes map: the ranks of one machine share one copy of the
feature arrays instead of building N (the OS keeps one set of pages, copy-on-write, for all of them).

`export_bundle` writes the arrays, the split's sample ends and the fitted transform into a folder;
`map_bundle` opens them again as memory maps. Once every process has mapped the files the folder can be
removed: the mappings stay valid until the processes end, and nothing is left behind.
"""
from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from .pipeline import SPLITS, DataBundle
from .transform import Transform
from .windows import SeriesArrays, WindowSet

NUMPY_FIELDS = ("history",)   # SeriesArrays fields kept as numpy (read by the evaluation, never by the model)


def export_bundle(bundle: DataBundle, folder: Path) -> None:
    """Write `bundle` into `folder` (created): one .npy per array and per split, transform.json."""
    folder.mkdir(parents=True, exist_ok=False)
    arrays = bundle.splits["train"].arrays
    for field in fields(SeriesArrays):
        value = getattr(arrays, field.name)
        if value is not None:   # tensors, and the volatility history (numpy)
            np.save(folder / f"{field.name}.npy", value.numpy() if isinstance(value, torch.Tensor) else value)
    for name in SPLITS:
        np.save(folder / f"ends_{name}.npy", bundle.splits[name].sample_ends.numpy())
    split = bundle.splits["train"]
    meta = {"transform": bundle.transform.to_dict(), "sequence_length": split.sequence_length, "horizon": split.horizon}
    (folder / "bundle.json").write_text(json.dumps(meta))


def map_bundle(folder: Path) -> DataBundle:
    """The bundle `export_bundle` wrote, its arrays memory-mapped copy-on-write (shared until written)."""
    meta = json.loads((folder / "bundle.json").read_text())

    def mapped(name: str) -> torch.Tensor | np.ndarray | None:
        path = folder / f"{name}.npy"
        if not path.is_file():
            return None
        array = np.load(path, mmap_mode="c")
        return array if name in NUMPY_FIELDS else torch.from_numpy(array)

    arrays = SeriesArrays(**{field.name: mapped(field.name) for field in fields(SeriesArrays)})
    splits = {name: WindowSet(arrays, np.load(folder / f"ends_{name}.npy"), meta["sequence_length"], meta["horizon"])
              for name in SPLITS}
    return DataBundle(splits=splits, transform=Transform.from_dict(meta["transform"], str(folder / "bundle.json")))
