"""The quant figures: equity curves of the model's backtests beside buy-and-hold (and later other baselines).

matplotlib's object API on the Agg canvas, as in report_plots: no pyplot, so no figure outlives its plot.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from .report_plots import _figure, to_png

WIDTH_INCHES, HEIGHT_INCHES = 8.0, 4.0    # at report_plots' 100 dpi: 800 x 400 pixels (the PNG is not cropped)


def _label(name: str) -> str:
    # a bare `$` starts mathtext: two in one label ("$BTC vs $ETH") would be typeset as maths, one raises
    return str(name).replace("$", r"\$")


def equity_curve_figure(curves: dict[str, pd.Series], title: str = "growth of 1, net of costs") -> Figure:
    """One line per curve (index: time; values: equity, 1.0 = the starting capital), in the order given."""
    if not curves:
        raise ValueError("equity_curve_figure needs at least one curve")
    fig = _figure(WIDTH_INCHES, HEIGHT_INCHES)
    ax = fig.subplots()
    for name, curve in curves.items():
        ax.plot(curve.index, curve.to_numpy(dtype=float), lw=1.2, label=_label(name))
    ax.axhline(1.0, color="black", lw=0.6, ls=":")
    ax.set_title(_label(title), fontsize=10)
    ax.set_ylabel("equity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.tick_params(labelsize=8)
    return fig


def equity_curve_png(curves: dict[str, pd.Series], path: str | Path, title: str = "growth of 1, net of costs") -> Path:
    """Write the equity curves as a PNG of 800 x 400 pixels to `path`; returns the path."""
    path = Path(path)
    path.write_bytes(to_png(equity_curve_figure(curves, title)))
    return path
