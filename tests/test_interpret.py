"""Variable importance and attention by lag: batch-by-batch means equal one-pass means; the CSVs add up."""
import pandas as pd
import pytest
import torch

from conftest import training_model
from enhanced_tft import tasks
from enhanced_tft.config.schema import build_config
from enhanced_tft.data.pipeline import build_data
from enhanced_tft.evaluation.interpret import WeightSums, attention_frame, importance_frames
from enhanced_tft.runtime.precision import resolve_precision
from enhanced_tft.serving.inference import infer

CPU = torch.device("cpu")
FP32 = resolve_precision("fp32", CPU)


def accumulate_weights(model, split, num_symbols, device, policy, batch_size):
    """The sums the test pass after training accumulates, chunk by chunk through inference.infer."""
    sums = WeightSums.for_model(model, num_symbols, split.sequence_length + split.horizon)
    for chunk in infer([model], tasks.BinaryClassification(), split, device, policy, batch_size, with_weights=True):
        sums.add_chunk(chunk.outputs[0], chunk.symbol)
    return sums


@pytest.fixture(scope="module")
def model_and_data():
    raw = {"seed": 7, "data": {"num_symbols": 3, "num_bars": 400, "sequence_length": 12},
           "model": {"d_model": 16, "num_heads": 2, "num_transformer_blocks": 2, "ff_dim": 32,
                     "variable_hidden_size": 4, "dropout_rate": 0.0}}
    cfg = build_config(raw)
    data = build_data(cfg)
    torch.manual_seed(0)
    return training_model(cfg, data).eval(), data


def test_means_over_batches_equal_the_mean_over_one_pass(model_and_data):
    model, data = model_and_data
    split = data.splits["test"]
    chunked = accumulate_weights(model, split, 3, CPU, FP32, batch_size=7)    # 7 does not divide the split
    whole = accumulate_weights(model, split, 3, CPU, FP32, batch_size=len(split))
    assert float(chunked.count_S.sum()) == len(split)
    for name in ("past_SF", "future_SF", "count_S", "attention_KhL"):
        # float32 kernels round differently at other batch sizes: equal to float32 precision, not to the bit
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=1e-6, rtol=1e-5, msg=name)

    # direct computation for one symbol: mean over its samples of the mean over time of the past weights
    batch = split.batch(split.all_indices())
    with torch.no_grad():
        out = model(batch["observed"], batch["known"], batch["symbol"], return_weights=True)
    mine = batch["symbol"] == 1
    expected = out.observed_weights[mine].double().mean(dim=(0, 1))
    torch.testing.assert_close(chunked.past_SF[1] / chunked.count_S[1], expected, atol=1e-7, rtol=1e-5)
    expected_last = out.attention[1].double().mean(dim=0)                             # block 1: (heads, L)
    torch.testing.assert_close(chunked.attention_KhL[1] / len(split), expected_last, atol=1e-7, rtol=1e-5)


def test_frames_add_up_and_name_every_variable(model_and_data):
    model, data = model_and_data
    sums = accumulate_weights(model, data.splits["test"], 3, CPU, FP32, batch_size=64)
    overall, by_symbol = importance_frames(sums, data.observed_names, data.known_names, data.symbols)
    past, future = overall[overall.selection == "past"], overall[overall.selection == "future"]
    assert sorted(past.variable) == sorted(data.observed_names + data.known_names)
    assert sorted(future.variable) == sorted(data.known_names)
    assert past.importance.sum() == pytest.approx(1.0, abs=1e-6)     # softmax over variables, then means
    assert future.importance.sum() == pytest.approx(1.0, abs=1e-6)
    assert list(past["rank"]) == list(range(1, len(past) + 1)) and past.importance.is_monotonic_decreasing
    assert set(by_symbol.symbol) == set(data.symbols)
    # the overall importance is the sample-weighted mean of the symbols'
    weighted = by_symbol[by_symbol.selection == "past"].assign(w=lambda f: f.importance * f.num_samples)
    recombined = weighted.groupby("variable").w.sum() / len(data.splits["test"])
    pd.testing.assert_series_equal(recombined.sort_index(), past.set_index("variable").importance.sort_index(),
                                   check_names=False, atol=1e-9, rtol=0)

    attention = attention_frame(sums, sequence_length=12)
    assert len(attention) == 2 * (12 + 1)                             # blocks x (T + H) positions
    assert attention.groupby("block").attention.sum().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert attention.groupby("block").head_0.sum().tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    first_block = attention[attention.block == 0]
    assert first_block.lag.tolist() == list(range(11, -2, -1))       # lag 0 = last observed bar, -1 = horizon
    assert first_block.loc[first_block.lag == 0, "position"].item() == 11
