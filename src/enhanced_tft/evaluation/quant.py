"""What a quant reads of a predictions table (`etft predict`'s rows: symbol, timestamp, actual, the task's
columns): information coefficients and a cost-aware backtest beside an equal-weight long benchmark.

Pure functions over a DataFrame, so that summary.json, `etft evaluate`, walk-forward results and the report
can call them. Conventions, chosen once here:
- the signal is centred: 0 is neutral, higher is more bullish (`signal_of`);
- `actual` is the log return over the horizon; a portfolio's period return is sum(weight * expm1(actual)),
  simple returns (they add across assets, log returns do not); equity compounds them: prod(1 + net);
- horizon > 1: non-overlapping periods, a rebalance every `horizon` bars of the timestamp grid, so each
  period's return is a return actually earned once (dividing overlapping returns by the horizon would
  only approximate the staggered portfolio);
- annualising: `periods_per_year` bars per year (inferred from the data when not given) / horizon. The span
  of a backtest is num_periods / periods_per_year years; a return is annualised only over a span of a year or
  more (`annualised_return` None otherwise: compounding 2 months to a year turns +80% into +1e8%), the span's own
  return (`total_return`) and the span in days stand instead. Sharpe and volatility are annualised as usual,
  x sqrt(periods_per_year), whatever the span (SHARPE_BASIS says so next to each number).
Rows whose outcome is unknown (actual NaN: the last bars of new data) are left out everywhere.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from .. import tasks

DAYS_PER_YEAR = 365.0     # a calendar year: hourly 24/7 bars give 24 * 365 = 8760 per year
MIN_YEARS_ANNUALISED = 1.0   # a shorter span shows its own return, not one compounded to a year
SHARPE_BASIS = "annualised: mean / std of the net period returns x sqrt(periods per year)"
MODES = ("sign", "rank")


# ---------------------------------------------------------------- the signal

def _signal_rule(task: type[tasks.Task]) -> tuple[str, Callable[[pd.DataFrame], pd.Series]]:
    """The task's score, centred on 0, from its columns (asked of the task class, not of its name)."""
    columns = set(task.columns)
    if task.probabilities and columns & {"p_up", "p_down"}:
        # P(up) - P(down): the expected direction; a lone P(up) implies P(down) = 1 - P(up)
        if {"p_up", "p_down"} <= columns:
            return "p_up - p_down", lambda f: f["p_up"] - f["p_down"]
        if "p_up" in columns:
            return "2 p_up - 1", lambda f: 2 * f["p_up"] - 1
        return "1 - 2 p_down", lambda f: 1 - 2 * f["p_down"]
    if not task.probabilities:
        point = task.columns[0] if len(task.columns) == 1 else "p50" if "p50" in columns else None
        if point is not None:
            return point, lambda f: f[point]
    raise ValueError(f"task {task.name!r} (columns {', '.join(task.columns)}): no directional score; quant metrics "
                     "need P(up)/P(down) columns, a single predicted value or a p50 column")


def signal_of(frame: pd.DataFrame, task_name: str) -> pd.Series:
    """The task's score per row, higher = more bullish, 0 = neutral: the predicted log return (regression), the
    median (quantile), P(up) - P(down) (classifiers; 2 P(up) - 1 for binary)."""
    _, rule = _signal_rule(tasks.get(task_name))
    return rule(frame).astype(float).rename("signal")


def _known(frame: pd.DataFrame, signal: pd.Series) -> pd.DataFrame:
    """symbol, timestamp, signal, actual of the rows whose signal and outcome are both known."""
    missing = [c for c in ("symbol", "timestamp", "actual") if c not in frame.columns]
    if missing:
        raise ValueError(f"the predictions table lacks column(s) {', '.join(missing)}; "
                         f"it has {', '.join(map(str, frame.columns))}")
    if not signal.index.equals(frame.index):
        raise ValueError("signal must be indexed like the predictions table (use signal_of(frame, task))")
    rows = pd.DataFrame({"symbol": frame["symbol"].astype(str), "timestamp": pd.to_datetime(frame["timestamp"]),
                         "signal": signal.astype(float), "actual": frame["actual"].astype(float)})
    if rows.duplicated(["symbol", "timestamp"]).any():
        raise ValueError("the predictions table has more than one row per (symbol, timestamp)")
    return rows[np.isfinite(rows.signal) & np.isfinite(rows.actual)].reset_index(drop=True)


def _number(value) -> float | None:
    """A plain float for JSON, None for NaN/inf/None."""
    return None if value is None or not math.isfinite(float(value)) else float(value)


# ---------------------------------------------------------------- information coefficients

def _correlation_by(rows: pd.DataFrame, key: str, x: str, y: str) -> pd.Series:
    """Pearson correlation of columns x and y within each group of `key`; NaN where x or y is constant."""
    groups = rows.groupby(key, sort=True)
    dx = rows[x] - groups[x].transform("mean")
    dy = rows[y] - groups[y].transform("mean")
    sums = pd.DataFrame({"xy": dx * dy, "xx": dx * dx, "yy": dy * dy, key: rows[key]}).groupby(key, sort=True).sum()
    # constant within a group, tested exactly: a mean of equal floats can leave a residue of 1e-17
    constant = (groups[x].max() == groups[x].min()) | (groups[y].max() == groups[y].min())
    correlation = (sums.xy / np.sqrt(sums.xx * sums.yy)).clip(-1.0, 1.0)
    return correlation.where(~constant)


def _correlations(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    """Per group of `key`: its size (count), Pearson IC, rank IC (Pearson of the ranks in the group, ties averaged)."""
    ranked = rows.assign(signal=rows.groupby(key).signal.rank(), actual=rows.groupby(key).actual.rank())
    return pd.DataFrame({"count": rows.groupby(key).size(), "pearson": _correlation_by(rows, key, "signal", "actual"),
                         "rank": _correlation_by(ranked, key, "signal", "actual")})


def _ic_table(rows: pd.DataFrame, min_symbols: int) -> pd.DataFrame:
    table = _correlations(rows, "timestamp").rename(columns={"count": "num_symbols"})
    status = np.where(table.num_symbols < min_symbols, "too_few_symbols",
                      np.where(table.pearson.isna(), "zero_variance", "ok"))
    table.loc[status != "ok", ["pearson", "rank"]] = np.nan
    return table.assign(status=status)


def ic_by_timestamp(frame: pd.DataFrame, signal: pd.Series, min_symbols: int = 2) -> pd.DataFrame:
    """Per timestamp: num_symbols, Pearson IC and rank IC across symbols (NaN where left out), and `status`:
    ok, too_few_symbols (fewer than min_symbols with a known outcome) or zero_variance."""
    return _ic_table(_known(frame, signal), min_symbols)


def _ic_stats(values: pd.Series) -> dict:
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    return {"mean": _number(values.mean()) if len(values) else None, "std": _number(std),
            "icir": _number(values.mean() / std) if std > 0 else None,
            "share_positive": _number((values > 0).mean()) if len(values) else None}


def information_coefficients(frame: pd.DataFrame, signal: pd.Series, min_symbols: int = 2) -> dict:
    """Cross-sectional IC per timestamp (mean, std, ICIR = mean / std per period, share > 0) and time-series IC
    per symbol, Pearson and rank (Spearman) each. With one symbol the cross-section is None, with a reason."""
    rows = _known(frame, signal)
    per_symbol = _correlations(rows, "symbol")
    time_series = {
        "per_symbol": {str(s): {"pearson": _number(r["pearson"]), "rank": _number(r["rank"]),
                                "num_observations": int(r["count"])} for s, r in per_symbol.iterrows()},
        "mean_pearson": _number(per_symbol.pearson.mean()), "mean_rank": _number(per_symbol["rank"].mean())}
    out = {"num_symbols": int(rows.symbol.nunique()), "num_rows": len(rows), "time_series": time_series}
    if out["num_symbols"] < max(min_symbols, 2):
        return {**out, "cross_sectional": None,
                "reason": f"{out['num_symbols']} symbol(s): a cross-sectional IC needs at least {max(min_symbols, 2)} "
                          "symbols per timestamp; read the time-series IC per symbol"}
    table = _ic_table(rows, min_symbols)
    used = table[table.status == "ok"]
    cross = {"pearson": _ic_stats(used.pearson), "rank": _ic_stats(used["rank"]), "num_timestamps": len(used),
             "num_skipped_too_few_symbols": int((table.status == "too_few_symbols").sum()),
             "num_skipped_zero_variance": int((table.status == "zero_variance").sum())}
    if not len(used):
        return {**out, "cross_sectional": None, "reason": f"no timestamp has {min_symbols} symbols with a known "
                "outcome and a varying signal", "skipped": cross}
    return {**out, "cross_sectional": cross}


# ---------------------------------------------------------------- backtest

def infer_periods_per_year(timestamps) -> float:
    """Bars per calendar year actually present: (number of distinct timestamps - 1) steps over their span, per
    365-day year. Hourly 24/7 bars give 8760, daily 24/7 365, business days ~261 (~252 once the data's
    exchange holidays are missing): weekends and holidays count as the absences they are."""
    grid = pd.DatetimeIndex(pd.unique(pd.to_datetime(pd.Series(timestamps)))).sort_values()
    if len(grid) < 2:
        raise ValueError(f"{len(grid)} distinct timestamp(s): cannot infer periods_per_year; give it")
    span_days = (grid[-1] - grid[0]) / pd.Timedelta(days=1)
    return (len(grid) - 1) * DAYS_PER_YEAR / span_days


@dataclass
class Performance:
    """One strategy over the backtest's periods (indexed by the timestamp each position is taken at; its
    return is realised over the following `horizon` bars)."""
    weights: pd.DataFrame    # (periods, symbols) the position held over each period; 0 where absent
    periods: pd.DataFrame    # per period: gross, turnover, cost, net (simple returns)
    equity: pd.Series        # prod(1 + net) up to and including each period: 1.0 = the starting capital
    stats: dict


@dataclass
class Backtest:
    strategy: Performance
    benchmark: Performance   # equal-weight long of the same symbols, same periods and costs
    settings: dict           # what ran: mode, costs, horizon, periods per year and where that number came from


def _sign_weights(signal: pd.DataFrame, long_only: bool) -> pd.DataFrame:
    present = signal.notna().sum(axis=1)
    direction = (signal > 0).astype(float) if long_only else np.sign(signal).fillna(0.0)
    return direction.div(present.where(present > 0), axis=0).fillna(0.0)   # 1/n per symbol: gross exposure <= 1


def _rank_weights(signal: pd.DataFrame, quantile: float, long_only: bool) -> pd.DataFrame:
    present = signal.notna().sum(axis=1)
    # ties broken by symbol order (method="first"): deterministic; epsilon keeps 0.29 * 100 from flooring to 28
    order = signal.rank(axis=1, method="first")
    varying = signal.max(axis=1) > signal.min(axis=1)   # all equal: no ranking, rather than one by symbol order
    k = np.maximum(np.floor(quantile * present + 1e-9), 1).where((present >= 2) & varying)
    top = order.gt(present - k, axis=0)
    bottom = order.le(k, axis=0)
    long_weight = (1.0 if long_only else 0.5) / k
    weights = top.mul(long_weight, axis=0) - (0.0 if long_only else bottom.mul(0.5 / k, axis=0))
    return weights.fillna(0.0)   # fewer than 2 symbols or one value: no cross-section, no position


def _performance(weights: pd.DataFrame, simple: pd.DataFrame, cost_bps: float, periods_per_year: float) -> Performance:
    gross = (weights * simple.fillna(0.0)).sum(axis=1)
    turnover = weights.diff().abs().sum(axis=1)
    turnover.iloc[0] = weights.iloc[0].abs().sum()   # the first positions are bought from cash
    cost = turnover * cost_bps / 1e4
    net = gross - cost
    equity = (1.0 + net).cumprod().rename("equity")
    periods = pd.DataFrame({"gross": gross, "turnover": turnover, "cost": cost, "net": net})
    return Performance(weights, periods, equity, _stats(periods, weights, equity, periods_per_year, cost_bps))


def span_text(days: float) -> str:
    """'over 67 days', 'over 3.2 years': the span a total return was earned over."""
    years = days / DAYS_PER_YEAR
    if years >= 2:
        return f"over {years:.1f} years"
    return f"over {days:,.0f} days" if days >= 2 else f"over {days:.2g} days"


def _stats(periods: pd.DataFrame, weights, equity, periods_per_year, cost_bps) -> dict:
    net, turnover = periods.net, periods.turnover
    n = len(net)
    years = n / periods_per_year
    final = float(equity.iloc[-1])
    std = net.std(ddof=1) if n > 1 else float("nan")
    peak = np.maximum.accumulate(np.concatenate([[1.0], equity.to_numpy()]))[1:]   # the start counts as a peak
    if years < MIN_YEARS_ANNUALISED:
        annualised = None
    else:
        annualised = _number(final ** (1.0 / years) - 1.0) if final > 0 else -1.0
    return {"num_periods": n,
            "span_days": _number(years * DAYS_PER_YEAR),
            "total_return": _number(final - 1.0),
            "total_log_return": _number(math.log(final)) if final > 0 else None,
            "annualised_return": annualised,
            "annualised_volatility": _number(std * math.sqrt(periods_per_year)),
            "sharpe": _number(net.mean() / std * math.sqrt(periods_per_year)) if std > 0 else None,
            "cost_bps": float(cost_bps),
            "turnover_per_period": _number(turnover.mean()),
            "turnover_per_year": _number(turnover.mean() * periods_per_year),
            "costs_total": _number(periods.cost.sum()),   # a share of capital: 0.02 = 2% paid over the span
            "max_drawdown": _number((equity.to_numpy() / peak - 1.0).min()),   # <= 0: -0.25 = a 25% fall
            "gross_exposure": _number(weights.abs().sum(axis=1).mean()),
            "hit_rate": _number((net > 0).mean())}


def backtest(frame: pd.DataFrame, signal: pd.Series, mode: str = "sign", cost_bps: float = 0.0,
             periods_per_year: float | None = None, horizon: int = 1, long_only: bool = False,
             quantile: float = 0.2) -> Backtest:
    """Trade the signal: "sign" = long (short) each symbol whose signal is > 0 (< 0), 1/n of capital each over
    the n symbols with a known outcome at that timestamp (long_only: flat instead of short); "rank" = long
    the top `quantile` of symbols by signal, short the bottom one, half the capital each side (dollar neutral;
    long_only: the top side with all of it). Costs: cost_bps / 1e4 x turnover, turnover = sum |w_t - w_prev|,
    the first period from cash. Rebalanced every `horizon` bars (non-overlapping periods)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(map(repr, MODES))}")
    if not 0 < quantile <= 0.5:
        raise ValueError(f"quantile={quantile!r}; allowed: 0 < quantile <= 0.5 (the share of symbols on each side)")
    if int(horizon) != horizon or horizon < 1:
        raise ValueError(f"horizon={horizon!r}; allowed: an integer >= 1 (bars the outcome spans)")
    if cost_bps < 0:
        raise ValueError(f"cost_bps={cost_bps!r}; allowed: >= 0")
    rows = _known(frame, signal)
    if not len(rows):
        raise ValueError("no row has both a signal and a known outcome (actual): nothing to backtest")
    if mode == "rank" and rows.symbol.nunique() < 2:
        raise ValueError("mode='rank' needs at least 2 symbols (a cross-section); this table has 1: use mode='sign'")
    bars_per_year = infer_periods_per_year(rows.timestamp) if periods_per_year is None else float(periods_per_year)
    if not bars_per_year > 0:
        raise ValueError(f"periods_per_year={periods_per_year!r}; allowed: > 0")
    # one row per bar of the timestamp grid, then every horizon-th bar: each outcome is earned once
    signal_wide = rows.pivot(index="timestamp", columns="symbol", values="signal").sort_index().iloc[::int(horizon)]
    simple = np.expm1(rows.pivot(index="timestamp", columns="symbol", values="actual").loc[signal_wide.index])
    weights = (_sign_weights(signal_wide, long_only) if mode == "sign"
               else _rank_weights(signal_wide, quantile, long_only))
    per_year = bars_per_year / horizon
    settings = {"mode": mode, "long_only": bool(long_only), "rank_share": float(quantile) if mode == "rank" else None,
                "cost_bps": float(cost_bps), "horizon": int(horizon), "bars_per_year": float(bars_per_year),
                "periods_per_year": float(per_year),
                "periods_per_year_source": "inferred" if periods_per_year is None else "given",
                "return_convention": "simple: period return = sum(weight * expm1(actual)); equity = prod(1 + net)",
                "overlap": "non-overlapping: rebalanced every horizon bars",
                "sharpe": SHARPE_BASIS,
                "annualised_return": f"only over a span of {MIN_YEARS_ANNUALISED:g} year or more (None otherwise: "
                                     "read total_return over span_days)",
                "num_symbols": int(rows.symbol.nunique())}
    present = signal_wide.notna()
    benchmark = present.div(present.sum(axis=1), axis=0)
    return Backtest(_performance(weights, simple, cost_bps, per_year),
                    _performance(benchmark, simple, cost_bps, per_year), settings)


# ---------------------------------------------------------------- summary.json and the console

STRATEGIES = (("sign", {"mode": "sign"}), ("sign_long_only", {"mode": "sign", "long_only": True}),
              ("rank", {"mode": "rank"}))


def quant_metrics(frame: pd.DataFrame, task_name: str, cost_bps: float = 0.0, periods_per_year: float | None = None,
                  horizon: int = 1, quantile: float = 0.2, min_symbols: int = 2, target: str = "return") -> dict:
    """IC and backtests (long/short by sign, long/flat by sign, rank long/short) of a predictions table, with the
    equal-weight long benchmark: one JSON-ready dict (plain numbers, None for undefined, never NaN)."""
    if target != "return":
        raise ValueError(f"target={target!r}: quant metrics trade a predicted return; a {target} forecast has no "
                         "direction (allowed: 'return')")
    description, _ = _signal_rule(tasks.get(task_name))
    signal = signal_of(frame, task_name)
    rows = _known(frame, signal)
    out = {"task": task_name, "signal": description, "num_rows": len(rows),
           "num_rows_left_out": int(len(frame) - len(rows)),
           "information_coefficient": information_coefficients(frame, signal, min_symbols)}
    runs = {}
    for name, options in STRATEGIES:
        if options["mode"] == "rank" and rows.symbol.nunique() < 2:
            runs[name] = {"skipped": "one symbol: no cross-section to rank"}
            continue
        result = backtest(frame, signal, cost_bps=cost_bps, periods_per_year=periods_per_year, horizon=horizon,
                          quantile=quantile, **options)
        runs[name] = {"mode": result.settings["mode"], "long_only": result.settings["long_only"],
                      "rank_share": result.settings["rank_share"], **result.strategy.stats}
        out.setdefault("benchmark", {"rule": "equal-weight long of the same symbols, rebalanced each period",
                                     **result.benchmark.stats})
        out.setdefault("settings", {k: v for k, v in result.settings.items()
                                    if k not in ("mode", "long_only", "rank_share")})
    out["backtest"] = runs
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    """A return as a percentage; beyond +-10,000% (a short test period annualised) in powers of ten."""
    if value is None:
        return "-"
    return f"{value:.1%}" if abs(value) < 100 else f"{'+' if value > 0 else '-'}1e{int(np.log10(abs(value)) + 2)}%"


def _bps(value: float | None) -> str:
    return "-" if value is None else f"{value:g}bps"


COLUMNS = ("total", "ann.ret", "vol", "Sharpe", "costs", "turnover", "maxDD", "hit")


def _row(label: str, s: dict) -> str:
    """Sharpe with its costs (bps per unit of turnover) and turnover per period beside it."""
    cells = [_percent(s["total_return"]), _percent(s["annualised_return"]), _fmt(s["annualised_volatility"], ".1%"),
             _fmt(s["sharpe"], ".2f"), _bps(s.get("cost_bps")), _fmt(s["turnover_per_period"], ".3f"),
             _fmt(s["max_drawdown"], ".1%"), _fmt(s["hit_rate"], ".1%")]
    return f"  {label:<26}" + "".join(f"{c:>10}" for c in cells)


def span_of(metrics: dict) -> float | None:
    """The backtest's span in days (the same for every strategy and the benchmark), None without a backtest."""
    stats = metrics.get("benchmark") or next((r for r in metrics["backtest"].values() if "skipped" not in r), {})
    return stats.get("span_days")


def format_quant(metrics: dict, strong: dict | None = None, blend: dict | None = None) -> str:
    """A few console lines: IC, then each backtest beside the benchmark; with `strong` (LightGBM's metrics on the
    same rows) and `blend` (the blend's), their IC and backtests below the model's."""
    ic = metrics["information_coefficient"]
    lines = [f"quant: signal {metrics['signal']} on {ic['num_symbols']} symbol(s), {metrics['num_rows']:,} rows "
             f"({metrics['num_rows_left_out']:,} without outcome left out)"]
    cross = ic["cross_sectional"]
    if cross is None:
        lines.append(f"  cross-sectional IC: n/a ({ic['reason']})")
    else:
        for kind in ("pearson", "rank"):
            s = cross[kind]
            lines.append(f"  {'IC' if kind == 'pearson' else 'rank IC':<8} mean {_fmt(s['mean'], '+.4f')}  std "
                         f"{_fmt(s['std'], '.4f')}  ICIR {_fmt(s['icir'], '+.3f')}  positive "
                         f"{_fmt(s['share_positive'], '.1%')}  over {cross['num_timestamps']:,} timestamps")
    ts = ic["time_series"]
    if ts["mean_pearson"] is not None:
        lines.append(f"  time-series IC (mean over symbols): {ts['mean_pearson']:+.4f}, "
                     f"rank {_fmt(ts['mean_rank'], '+.4f')}")
    settings = metrics.get("settings")
    if settings:
        days = span_of(metrics)
        short = days is not None and days < MIN_YEARS_ANNUALISED * DAYS_PER_YEAR
        per_year = settings["periods_per_year"]
        lines.append(f"  backtest {span_text(days) if days is not None else ''}: {settings['cost_bps']:g} bps per unit "
                     f"of turnover, {per_year:,.1f} periods/yr ({settings['horizon']} bar(s) each), "
                     "simple returns, net of costs")
        lines.append(f"  total = return over the span; Sharpe and vol annualised (x sqrt({per_year:,.0f} periods/yr)); "
                     "ann.ret " + ("not shown: the span is under a year" if short
                                   else "compounded over the span's years"))
        lines.append(f"  {'':<26}" + "".join(f"{h:>10}" for h in COLUMNS))
    for name, run in metrics["backtest"].items():
        lines.append(f"  {name:<26}{run['skipped']}" if "skipped" in run else _row(name, run))
    if "benchmark" in metrics:
        lines.append(_row("equal-weight long", metrics["benchmark"]))
    for label, other in (("LightGBM", strong), ("blend", blend)):
        if other is None:
            continue
        cross = other["information_coefficient"]["cross_sectional"]
        for name, run in other["backtest"].items():
            if "skipped" not in run:
                lines.append(_row(f"{label} {name}", run))
        if cross is not None:
            lines.append(f"  {label} IC mean {_fmt(cross['pearson']['mean'], '+.4f')}, rank IC mean "
                         f"{_fmt(cross['rank']['mean'], '+.4f')}")
    return "\n".join(lines)
