"""Quant metrics of a predictions table, against numbers worked out by hand: IC and rank IC, a backtest with
costs, rank and long-only modes, rows without outcome, annualisation, the JSON record and the equity PNG."""
import json
import math
import statistics

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from conftest import SHARED_DATA
from enhanced_tft import tasks
from enhanced_tft.evaluation import quant
from enhanced_tft.report.quant_plots import equity_curve_png

EXACT = 1e-12   # tolerance of the hand-computed numbers (float rounding only)
DAYS = pd.date_range("2024-01-01", periods=6, freq="D")


def _table(signal: dict, actual: dict, column: str = "value") -> pd.DataFrame:
    """{symbol: [per timestamp]} -> rows of a regression predictions table (the score column is `value`)."""
    rows = [{"symbol": s, "timestamp": DAYS[i], "actual": a, column: v}
            for s in signal for i, (v, a) in enumerate(zip(signal[s], actual[s])) if v is not None]
    return pd.DataFrame(rows)


def _simple(returns: list[float]) -> list[float]:
    """actual is a log return: log(1 + r) makes the simple return exactly r."""
    return [math.log1p(r) for r in returns]


# ---------------------------------------------------------------- signal

def test_signal_of_each_task_is_centred_and_bullish_when_higher():
    frame = pd.DataFrame({"value": [0.02], "p10": [-0.01], "p50": [0.003], "p90": [0.02], "p_down": [0.2],
                          "p_flat": [0.3], "p_up": [0.5]})
    assert quant.signal_of(frame, "regression").tolist() == [0.02]
    assert quant.signal_of(frame, "quantile").tolist() == [0.003]
    assert quant.signal_of(frame, "classification_binary").tolist() == [0.0]            # 2 * 0.5 - 1: neutral
    assert quant.signal_of(frame, "classification_multiclass").tolist() == pytest.approx([0.3], abs=EXACT)  # 0.5 - 0.2
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        quant.signal_of(frame, "nope")


class BigMove(tasks.Task):
    name = "big_move_test"
    columns = ("p_big",)
    probabilities = True


def test_a_task_without_direction_is_refused_by_name():
    tasks.register(BigMove)
    try:
        with pytest.raises(ValueError, match=r"task 'big_move_test' \(columns p_big\): no directional score"):
            quant.signal_of(pd.DataFrame({"p_big": [0.4]}), "big_move_test")
    finally:
        tasks.REGISTRY.pop(BigMove.name)


# ---------------------------------------------------------------- information coefficients

def _ic_case() -> pd.DataFrame:
    # signal 1, 2, 3, 4 for A..D at t0-t2; t3 has A alone; t4 a constant signal (zero variance)
    signal = {"A": [1, 1, 1, 1, 2], "B": [2, 2, 2, None, 2], "C": [3, 3, 3, None, 2], "D": [4, 4, 4, None, 2]}
    actual = {"A": [.01, .04, .01, .05, .01], "B": [.03, .03, .02, 0, .02], "C": [.02, .02, .03, 0, .03],
              "D": [.04, .01, .10, 0, .04]}
    return _table(signal, actual)


def test_cross_sectional_ic_and_rank_ic_by_hand():
    frame = _ic_case()
    # signal deviations from 2.5: -1.5, -0.5, 0.5, 1.5 (sum of squares 5)
    # t0 actual 1,3,2,4 (%): deviations -1.5, .5, -.5, 1.5; cross 2.25 - .25 - .25 + 2.25 = 4; IC = 4 / sqrt(5 * 5)
    #    = 0.8; ranks are the values themselves: rank IC 0.8
    # t1 actual 4,3,2,1: IC -1, rank IC -1
    # t2 actual 1,2,3,10: mean 4, deviations -3,-2,-1,6; cross 4.5 + 1 - .5 + 9 = 14; squares 50
    #    IC = 14 / sqrt(5 * 50) = 14 / sqrt(250); ranks 1,2,3,4: rank IC 1
    pearson, rank = [0.8, -1.0, 14 / math.sqrt(250)], [0.8, -1.0, 1.0]
    by_time = quant.ic_by_timestamp(frame, quant.signal_of(frame, "regression"))
    assert by_time.status.tolist() == ["ok", "ok", "ok", "too_few_symbols", "zero_variance"]
    assert by_time.num_symbols.tolist() == [4, 4, 4, 1, 4]
    assert np.allclose(by_time.pearson.iloc[:3], pearson, atol=EXACT, rtol=0)
    assert np.allclose(by_time["rank"].iloc[:3], rank, atol=EXACT, rtol=0)

    ic = quant.information_coefficients(frame, quant.signal_of(frame, "regression"))
    cross = ic["cross_sectional"]
    skipped = (cross["num_skipped_too_few_symbols"], cross["num_skipped_zero_variance"])
    assert cross["num_timestamps"] == 3 and skipped == (1, 1)
    for kind, values in (("pearson", pearson), ("rank", rank)):
        mean, std = sum(values) / 3, statistics.stdev(values)
        assert cross[kind]["mean"] == pytest.approx(mean, abs=EXACT)
        assert cross[kind]["std"] == pytest.approx(std, abs=EXACT)
        assert cross[kind]["icir"] == pytest.approx(mean / std, abs=EXACT)
        assert cross[kind]["share_positive"] == pytest.approx(2 / 3, abs=EXACT)
    assert cross["rank"]["mean"] == pytest.approx(0.8 / 3, abs=EXACT)


def test_single_symbol_has_no_cross_section_but_a_time_series_ic():
    # over time: signal 1,2,3,4 against actual 1,2,3,10 (%): IC 14 / sqrt(250) (as t2 above), rank IC 1
    frame = _table({"A": [1, 2, 3, 4, 5]}, {"A": [.01, .02, .03, .10, np.nan]})
    ic = quant.information_coefficients(frame, quant.signal_of(frame, "regression"))
    assert ic["cross_sectional"] is None and ic["reason"].startswith("1 symbol(s): a cross-sectional IC needs")
    assert ic["time_series"]["per_symbol"]["A"] == {"pearson": pytest.approx(14 / math.sqrt(250), abs=EXACT),
                                                    "rank": pytest.approx(1.0, abs=EXACT), "num_observations": 4}
    metrics = quant.quant_metrics(frame, "regression", periods_per_year=365)
    assert metrics["backtest"]["rank"] == {"skipped": "one symbol: no cross-section to rank"}
    assert metrics["num_rows_left_out"] == 1
    assert "cross-sectional IC: n/a (1 symbol(s)" in quant.format_quant(metrics)


# ---------------------------------------------------------------- backtest

SIGNAL = {"A": [1, 1, -1, -1], "B": [1, -1, -1, -1]}
RETURNS = {"A": [.10, .04, .10, -.02], "B": [.02, -.06, .10, -.04]}   # simple returns per period


def _path() -> pd.DataFrame:
    return _table(SIGNAL, {s: _simple(r) for s, r in RETURNS.items()})


def test_sign_backtest_with_costs_on_a_hand_computed_path():
    result = quant.backtest(_path(), quant.signal_of(_path(), "regression"), cost_bps=10, periods_per_year=252)
    periods = result.strategy.periods
    # weights (A, B): t0 (.5, .5), t1 (.5, -.5), t2 (-.5, -.5), t3 (-.5, -.5); turnover from cash: 1, 1, 1, 0
    # gross: .5*.10 + .5*.02 = .06; .5*.04 + .5*.06 = .05; -.5*.10 - .5*.10 = -.10; .5*.02 + .5*.04 = .03
    # net = gross - 10e-4 * turnover
    gross, turnover, net = [.06, .05, -.10, .03], [1.0, 1.0, 1.0, 0.0], [.059, .049, -.101, .03]
    assert np.allclose(periods.gross, gross, atol=EXACT, rtol=0)
    assert np.allclose(periods.turnover, turnover, atol=EXACT, rtol=0)
    assert np.allclose(periods.net, net, atol=EXACT, rtol=0)
    # equity 1.059, 1.059 * 1.049 = 1.110891, * .899 = 0.998691009, * 1.03 = 1.02865173927
    assert np.allclose(result.strategy.equity, [1.059, 1.110891, 0.998691009, 1.02865173927], atol=EXACT, rtol=0)
    stats = result.strategy.stats
    assert stats["total_return"] == pytest.approx(0.02865173927, abs=EXACT)
    assert stats["max_drawdown"] == pytest.approx(-0.101, abs=EXACT)   # peak 1.110891 -> 0.998691009: x 0.899
    assert (stats["num_periods"], stats["hit_rate"], stats["turnover_per_period"]) == (4, 0.75, 0.75)
    # 4 periods at 252 a year: a span of 4/252 years (5.8 days) is not compounded to a year
    assert stats["annualised_return"] is None
    assert stats["span_days"] == pytest.approx(4 / 252 * 365, abs=EXACT)
    # the costs and the turnover that stand beside the Sharpe
    assert (stats["cost_bps"], stats["turnover_per_year"]) == (10.0, pytest.approx(0.75 * 252, abs=EXACT))
    assert stats["costs_total"] == pytest.approx(3 * 10e-4, abs=EXACT)
    assert stats["annualised_volatility"] == pytest.approx(statistics.stdev(net) * math.sqrt(252), abs=EXACT)
    assert stats["sharpe"] == pytest.approx(statistics.mean(net) / statistics.stdev(net) * math.sqrt(252), rel=1e-9)
    # benchmark: (.5, .5) throughout, bought once: gross .06, -.01, .10, -.03; net .059, -.01, .10, -.03
    bench = result.benchmark.periods
    assert np.allclose(bench.turnover, [1, 0, 0, 0], atol=EXACT, rtol=0)
    assert np.allclose(bench.net, [.059, -.01, .10, -.03], atol=EXACT, rtol=0)
    assert result.benchmark.stats["total_return"] == pytest.approx(1.059 * .99 * 1.1 * .97 - 1, abs=EXACT)


def test_losing_from_the_start_and_a_missing_symbol():
    signal = {"A": [-1, -1, 1, 1], "B": [-1, 1, 1, None]}        # B has no row at t3: A alone takes the capital
    frame = _table(signal, {s: _simple(r) for s, r in RETURNS.items()})
    result = quant.backtest(frame, quant.signal_of(frame, "regression"), cost_bps=10, periods_per_year=252)
    # weights (-.5, -.5), (-.5, .5), (.5, .5), (1, 0); turnover 1, 1, 1, .5 + .5 = 1
    # gross -.06, -.5*.04 - .5*.06 = -.05, .10, 1 * -.02 = -.02; net = gross - .001
    assert np.allclose(result.strategy.weights.to_numpy(), [[-.5, -.5], [-.5, .5], [.5, .5], [1, 0]], atol=0, rtol=0)
    assert np.allclose(result.strategy.periods.net, [-.061, -.051, .099, -.021], atol=EXACT, rtol=0)
    # equity .939, .939 * .949 = .891111, * 1.099 = .979330989, * .979 = .958765038231; the start (1.0) is the
    # peak of the deepest fall: 0.891111 - 1
    assert result.strategy.stats["max_drawdown"] == pytest.approx(-0.108889, abs=EXACT)
    assert result.strategy.stats["total_return"] == pytest.approx(-0.041234961769, abs=EXACT)
    assert result.strategy.stats["hit_rate"] == 0.25


def test_long_only_is_flat_instead_of_short():
    result = quant.backtest(_path(), quant.signal_of(_path(), "regression"), cost_bps=10, periods_per_year=252,
                            long_only=True)
    # weights t0 (.5, .5), t1 (.5, 0), t2 and t3 flat: turnover 1, .5, .5, 0; gross .06, .02, 0, 0
    assert np.allclose(result.strategy.weights.to_numpy(), [[.5, .5], [.5, 0], [0, 0], [0, 0]], atol=0, rtol=0)
    assert np.allclose(result.strategy.periods.turnover, [1, .5, .5, 0], atol=EXACT, rtol=0)
    assert np.allclose(result.strategy.periods.net, [.059, .0195, -.0005, 0], atol=EXACT, rtol=0)


def test_rows_without_outcome_are_left_out():
    frame = _path()
    unknown = pd.DataFrame({"symbol": ["A", "B", "C", "C"], "timestamp": [DAYS[4], DAYS[4], DAYS[0], DAYS[2]],
                            "actual": np.nan, "value": [1.0, -1.0, 5.0, -5.0]})
    padded = pd.concat([frame, unknown], ignore_index=True)
    clean = quant.backtest(frame, quant.signal_of(frame, "regression"), cost_bps=10, periods_per_year=252)
    result = quant.backtest(padded, quant.signal_of(padded, "regression"), cost_bps=10, periods_per_year=252)
    pd.testing.assert_frame_equal(result.strategy.periods, clean.strategy.periods)
    assert result.strategy.stats == clean.strategy.stats and list(result.strategy.weights.columns) == ["A", "B"]
    assert quant.quant_metrics(padded, "regression", periods_per_year=252)["num_rows_left_out"] == 4


def test_rank_mode_is_dollar_neutral_on_the_tails():
    signal = {"A": [5, 1, 0], "B": [4, 2, 0], "C": [3, 3, 0], "D": [2, 4, 0], "E": [1, 5, 0]}   # t2: no opinion
    returns = {"A": [.10, .02, .01], "B": [0, 0, 0], "C": [0, 0, 0], "D": [0, 0, 0], "E": [-.04, .06, 0]}
    frame = _table(signal, {s: _simple(r) for s, r in returns.items()})
    result = quant.backtest(frame, quant.signal_of(frame, "regression"), mode="rank", quantile=0.2,
                            periods_per_year=252)
    # 20% of 5 symbols: one each side; t0 long A short E, t1 the reverse, t2 flat (all signals equal)
    assert np.allclose(result.strategy.weights.to_numpy(), [[.5, 0, 0, 0, -.5], [-.5, 0, 0, 0, .5], [0] * 5],
                       atol=0, rtol=0)
    # gross t0 .5*.10 + .5*.04 = .07, t1 .5*.06 - .5*.02 = .02, t2 0; turnover 1, 2 (both legs flip), 1 (closed)
    assert np.allclose(result.strategy.periods.gross, [.07, .02, 0], atol=EXACT, rtol=0)
    assert np.allclose(result.strategy.periods.turnover, [1, 2, 1], atol=EXACT, rtol=0)
    assert np.allclose(result.strategy.weights.sum(axis=1), 0, atol=EXACT, rtol=0)
    wider = quant.backtest(frame, quant.signal_of(frame, "regression"), mode="rank", quantile=0.4,
                           periods_per_year=252)
    assert np.allclose(wider.strategy.weights.iloc[0], [.25, .25, 0, -.25, -.25], atol=0, rtol=0)
    long_only = quant.backtest(frame, quant.signal_of(frame, "regression"), mode="rank", long_only=True,
                               periods_per_year=252)
    assert np.allclose(long_only.strategy.periods.gross, [.10, .06, 0], atol=EXACT, rtol=0)   # all on A, then E
    with pytest.raises(ValueError, match="mode='rank' needs at least 2 symbols"):
        one = frame[frame.symbol == "A"]
        quant.backtest(one, quant.signal_of(one, "regression"), mode="rank", periods_per_year=252)


def test_a_longer_horizon_trades_non_overlapping_periods():
    result = quant.backtest(_path(), quant.signal_of(_path(), "regression"), horizon=2, periods_per_year=252)
    assert list(result.strategy.periods.index) == [DAYS[0], DAYS[2]]   # every second bar: each outcome earned once
    assert np.allclose(result.strategy.periods.gross, [.06, -.10], atol=EXACT, rtol=0)
    assert result.settings["periods_per_year"] == 126.0


def test_bad_settings_name_the_value_and_what_is_allowed():
    frame, signal = _path(), quant.signal_of(_path(), "regression")
    for kwargs, message in (({"mode": "momentum"}, "mode='momentum'; allowed: 'sign', 'rank'"),
                            ({"quantile": 0.6}, "quantile=0.6; allowed: 0 < quantile <= 0.5"),
                            ({"horizon": 0}, "horizon=0; allowed: an integer >= 1")):
        with pytest.raises(ValueError, match=message):
            quant.backtest(frame, signal, **kwargs)
    with pytest.raises(ValueError, match="more than one row per"):
        doubled = pd.concat([frame, frame], ignore_index=True)
        quant.backtest(doubled, quant.signal_of(doubled, "regression"))
    with pytest.raises(ValueError, match="target='volatility'"):
        quant.quant_metrics(frame, "regression", target="volatility")


# ---------------------------------------------------------------- annualisation

def test_periods_per_year_from_the_bars_present():
    hourly = pd.date_range("2024-01-01", periods=24 * 30, freq="h")
    assert quant.infer_periods_per_year(hourly) == pytest.approx(24 * 365, rel=1e-12)
    assert quant.infer_periods_per_year(pd.date_range("2024-01-01", periods=90, freq="D")) == pytest.approx(365)
    # weekdays of two years: 5/7 of 365 = 260.7, give or take the weekend at either end
    business = quant.infer_periods_per_year(pd.bdate_range("2021-01-01", "2022-12-31"))
    assert 259 < business < 263
    with pytest.raises(ValueError, match="1 distinct timestamp"):
        quant.infer_periods_per_year([DAYS[0], DAYS[0]])
    result = quant.backtest(_path(), quant.signal_of(_path(), "regression"))   # 4 daily bars: 3 steps in 3 days
    assert (result.settings["periods_per_year"], result.settings["periods_per_year_source"]) == (365.0, "inferred")


# ---------------------------------------------------------------- the record and the figure

def _no_nan(value) -> bool:
    if isinstance(value, dict):
        return all(_no_nan(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_nan(v) for v in value)
    return value is None or isinstance(value, (str, bool, int)) or (type(value) is float and math.isfinite(value))


def test_quant_metrics_is_plain_json_without_nan():
    rng = np.random.default_rng(3)
    stamps = pd.date_range("2024-01-01", periods=60, freq="h")
    frame = pd.DataFrame({"symbol": np.repeat(["$BTC", "ETH", "SOL"], 60), "timestamp": np.tile(stamps, 3),
                          "actual": rng.normal(0, 0.01, 180).astype(np.float32),
                          "p_up": rng.uniform(0, 1, 180).astype(np.float32)})
    frame.loc[frame.timestamp == stamps[-1], "actual"] = np.nan         # the outcome of the last bar is unknown
    frame.loc[frame.timestamp == stamps[5], "p_up"] = np.float32(0.5)   # a timestamp without variance
    metrics = quant.quant_metrics(frame, "classification_binary", cost_bps=5)
    text = json.dumps(metrics, allow_nan=False)
    assert _no_nan(json.loads(text)) and _no_nan(metrics)
    assert metrics["signal"] == "2 p_up - 1" and metrics["num_rows"] == 177
    assert metrics["information_coefficient"]["cross_sectional"]["num_skipped_zero_variance"] == 1
    assert set(metrics["backtest"]) == {"sign", "sign_long_only", "rank"}
    assert metrics["settings"]["periods_per_year"] == pytest.approx(8760)
    console = quant.format_quant(metrics)
    assert console.startswith("quant: signal 2 p_up - 1 on 3 symbol(s), 177 rows (3 without outcome left out)")
    assert "rank IC  mean" in console and "equal-weight long" in console


def test_a_span_of_a_year_or_more_is_annualised_by_hand():
    # the same 4 periods at 2 a year: 2 years, equity 1.02865173927 -> (1.02865173927) ** (1 / 2) - 1
    result = quant.backtest(_path(), quant.signal_of(_path(), "regression"), cost_bps=10, periods_per_year=2)
    stats = result.strategy.stats
    assert stats["span_days"] == pytest.approx(730, abs=EXACT)
    assert stats["annualised_return"] == pytest.approx(math.sqrt(1.02865173927) - 1, abs=EXACT)
    net = [.059, .049, -.101, .03]
    assert stats["sharpe"] == pytest.approx(statistics.mean(net) / statistics.stdev(net) * math.sqrt(2), rel=1e-9)
    # exactly one year still counts: 4 periods at 4 a year
    one_year = quant.backtest(_path(), quant.signal_of(_path(), "regression"), cost_bps=10, periods_per_year=4)
    assert one_year.strategy.stats["annualised_return"] == pytest.approx(0.02865173927, abs=EXACT)


def _console_rows(console: str) -> dict[str, list[str]]:
    """The backtest table's cells by row label (labels are single words here)."""
    lines = console.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["total", "ann.ret"])
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1:] if not line.startswith("  equal")}


def test_console_states_the_span_and_costs_beside_each_sharpe():
    short = quant.quant_metrics(_path(), "regression", cost_bps=10, periods_per_year=365)   # 4 daily periods
    console = quant.format_quant(short)
    assert "backtest over 4 days: 10 bps per unit of turnover" in console
    assert "Sharpe and vol annualised (x sqrt(365 periods/yr)); ann.ret not shown: the span is under a year" in console
    assert "  total   ann.ret       vol    Sharpe     costs  turnover     maxDD       hit" in console
    sign = _console_rows(console)["sign"]
    net = [.059, .049, -.101, .03]
    sharpe = statistics.mean(net) / statistics.stdev(net) * math.sqrt(365)
    assert sign[:6] == ["2.9%", "-", f"{statistics.stdev(net) * math.sqrt(365):.1%}", f"{sharpe:.2f}", "10bps",
                        "0.750"]
    long_span = quant.format_quant(quant.quant_metrics(_path(), "regression", cost_bps=10, periods_per_year=2))
    assert "backtest over 2.0 years" in long_span and "ann.ret compounded over the span's years" in long_span
    assert _console_rows(long_span)["sign"][1] == f"{math.sqrt(1.02865173927) - 1:.1%}"


def test_report_section_shows_the_span_and_no_annualised_return_when_short():
    from types import SimpleNamespace

    from enhanced_tft.report.page import section_quant
    short = quant.quant_metrics(_path(), "regression", cost_bps=10, periods_per_year=365)
    page = section_quant(SimpleNamespace(summary={"quant": {"model": short}}, csv=lambda name: None))
    assert "<th>return over 4 days</th>" in page and "annualised return" not in page
    assert "<th>Sharpe (ann.)</th><th>costs (bps)</th><th>turnover / period</th>" in page
    assert "x sqrt(365)" in page and "The span is under a year: its own return is shown" in page
    assert "<td>model: sign</td><td>0.0287</td>" in page and "<td>10</td><td>0.7500</td>" in page
    long_span = quant.quant_metrics(_path(), "regression", cost_bps=10, periods_per_year=2)
    page = section_quant(SimpleNamespace(summary={"quant": {"model": long_span}}, csv=lambda name: None))
    assert "<th>return over 2.0 years</th><th>annualised return</th>" in page
    assert f"<td>model: sign</td><td>0.0287</td><td>{math.sqrt(1.02865173927) - 1:.4f}</td>" in page


def test_equity_png_has_the_expected_size(tmp_path):
    result = quant.backtest(_path(), quant.signal_of(_path(), "regression"), cost_bps=10, periods_per_year=252)
    path = tmp_path / "equity.png"   # two `$`: as mathtext this label would be typeset as maths or fail
    path.write_bytes(equity_curve_png({"model on US$_$X and $ETH": result.strategy.equity,
                                       "buy & hold": result.benchmark.equity}))
    image = imread(path)
    assert image.shape == (400, 800, 4)
    assert image[..., :3].std() > 0.05   # lines drawn, not a blank canvas


def test_real_daily_stocks_annualise_over_three_years_and_not_over_sixty_days():
    """AAPL, IBM, MSFT daily bars (split-adjusted): a one-day momentum signal traded long/short by sign. Over the
    last three years the return is annualised, the same number as by hand; over the last 60 bars it is not, and
    the console states the span."""
    path = SHARED_DATA / "us_stocks_daily_5sym_2000_2013_quandl_wiki_pd.csv.gz"
    if not path.is_file():
        pytest.skip(f"real market data {path.name} not found in {SHARED_DATA} (the shared data folder beside the "
                    "project is absent in a fresh clone)")
    bars = pd.read_csv(path, parse_dates=["date"])
    bars = bars[bars.symbol.isin(["AAPL", "IBM", "MSFT"])].sort_values(["symbol", "date"])
    log_close = np.log(bars.adj_close)
    past = log_close.groupby(bars.symbol).diff()                 # known at the close of the day: the signal
    frame = pd.DataFrame({"symbol": bars.symbol, "timestamp": bars.date, "value": past,
                          "actual": past.groupby(bars.symbol).shift(-1)}).dropna()   # the next day's log return
    stamps = np.sort(frame.timestamp.unique())

    long_span = frame[frame.timestamp >= stamps[-1] - np.timedelta64(3 * 365, "D")]
    stats = quant.quant_metrics(long_span, "regression", cost_bps=5)["backtest"]["sign"]
    # by hand: 1/3 of capital per symbol in the direction of its signal, costs on the change of weights
    weights = np.sign(long_span.pivot(index="timestamp", columns="symbol", values="value")) / 3
    simple = np.expm1(long_span.pivot(index="timestamp", columns="symbol", values="actual"))
    turnover = weights.diff().abs().sum(axis=1)
    turnover.iloc[0] = weights.iloc[0].abs().sum()
    net = (weights * simple).sum(axis=1) - turnover * 5e-4
    grid = weights.index
    per_year = (len(grid) - 1) * 365 / ((grid[-1] - grid[0]) / pd.Timedelta(days=1))
    years = len(net) / per_year
    assert 245 < per_year < 255 and 2.9 < years < 3.1            # trading days: weekends and holidays are absent
    assert stats["span_days"] == pytest.approx(years * 365, rel=1e-12)
    assert stats["total_return"] == pytest.approx(np.prod(1 + net) - 1, rel=1e-9)
    assert stats["annualised_return"] == pytest.approx(np.prod(1 + net) ** (1 / years) - 1, rel=1e-9)
    assert stats["sharpe"] == pytest.approx(net.mean() / net.std(ddof=1) * math.sqrt(per_year), rel=1e-9)
    assert (stats["cost_bps"], stats["turnover_per_period"]) == (5.0, pytest.approx(turnover.mean(), rel=1e-12))

    short = frame[frame.timestamp >= stamps[-60]]
    metrics = quant.quant_metrics(short, "regression", cost_bps=5)
    days = metrics["backtest"]["sign"]["span_days"]
    assert metrics["backtest"]["sign"]["annualised_return"] is None and 80 < days < 95
    assert f"backtest over {days:,.0f} days: 5 bps per unit of turnover" in quant.format_quant(metrics)
