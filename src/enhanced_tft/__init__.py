"""Enhanced TFT: Temporal Fusion Transformers with stacked transformer blocks for market time series.

The public API, importable from the package itself; torch and the rest load on first use:

    import enhanced_tft as et
    run = et.train("configs/default.yaml", overrides=["train.epochs=2"])
    et.Run.open(run.path).predict()
    et.plan(et.Config.load("configs/seed_original.yaml"), "24GiB")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["Config", "Plan", "Run", "UserError", "plan", "resume", "train"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
