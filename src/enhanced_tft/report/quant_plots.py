"""The quant figures: equity curves of the model's backtest beside LightGBM's and an equal-weight long.

matplotlib's object API on the Agg canvas, as in report/plots.py: no pyplot, so no figure outlives its plot.
Labels come from the data (symbols like $BTC): they are text, never mathtext.
"""
from __future__ import annotations

import matplotlib
import pandas as pd
from matplotlib.figure import Figure

from .plots import new_figure, to_png

WIDTH_INCHES, HEIGHT_INCHES = 8.0, 4.0    # at report/plots.py's 100 dpi: 800 x 400 pixels (the PNG is not cropped)


def equity_curve_figure(curves: dict[str, pd.Series], title: str = "growth of 1, net of costs") -> Figure:
    """One line per curve (index: time; values: equity, 1.0 = the starting capital), in the order given."""
    if not curves:
        raise ValueError("equity_curve_figure needs at least one curve")
    with matplotlib.rc_context({"text.parse_math": False}):   # read when each text is made
        fig = new_figure(WIDTH_INCHES, HEIGHT_INCHES)
        ax = fig.subplots()
        for name, curve in curves.items():
            ax.plot(curve.index, curve.to_numpy(dtype=float), lw=1.2, label=str(name))
        ax.axhline(1.0, color="black", lw=0.6, ls=":")
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("equity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        ax.tick_params(labelsize=8)
    return fig


def equity_curve_png(curves: dict[str, pd.Series], title: str = "growth of 1, net of costs") -> bytes:
    """The equity curves as PNG bytes of 800 x 400 pixels (the report embeds them)."""
    return to_png(equity_curve_figure(curves, title))
