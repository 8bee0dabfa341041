import pytest
import torch

from enhanced_tft.config import build_config
from enhanced_tft.model.layers import VariableSelection
from enhanced_tft.model.tft import CausalSelfAttentionBlock, ModelDims, build_model

DIMS = ModelDims(num_observed=5, num_known=4, num_symbols=3, horizon=1)


def _inputs(batch=6, steps=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, steps, DIMS.num_observed, generator=g),
            torch.randn(batch, steps + DIMS.horizon, DIMS.num_known, generator=g),
            torch.randint(0, DIMS.num_symbols, (batch,), generator=g))


@pytest.mark.parametrize("task, width", [("regression", 1), ("quantile", 3), ("classification_binary", 1),
                                         ("classification_multiclass", 3)])
def test_output_shapes_and_float32_heads(task, width, small_raw):
    small_raw["task"] = task
    torch.manual_seed(0)
    model = build_model(build_config(small_raw), DIMS)
    out = model(*_inputs())
    assert out.output.shape == (6, width) and out.output.dtype == torch.float32
    assert out.observed_weights is None and out.attention is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(*_inputs())
    assert out16.output.dtype == torch.float32           # the head leaves autocast
    loss = model.head.loss(out16.output, torch.zeros(6))
    assert loss.dtype == torch.float32 and loss.shape == (6,)


def test_weights_only_when_asked_and_they_are_distributions(small_raw):
    torch.manual_seed(0)
    model = build_model(build_config(small_raw), DIMS).eval()
    plain = model(*_inputs())
    out = model(*_inputs(), return_weights=True)
    torch.testing.assert_close(plain.output, out.output, atol=1e-5, rtol=1e-5)   # same maths, manual attention
    assert out.observed_weights.shape == (6, 12, DIMS.num_observed + DIMS.num_known)
    assert out.future_weights.shape == (6, 1, DIMS.num_known)
    torch.testing.assert_close(out.observed_weights.sum(-1), torch.ones(6, 12))
    attention = out.attention[0]
    assert attention.shape == (6, 2, 13, 13)
    torch.testing.assert_close(attention.sum(-1), torch.ones(6, 2, 13))
    assert float(attention.detach().triu(1).abs().max()) == 0.0     # causal: nothing attends to a later step


def test_attention_is_causal():
    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(16, 4, 32, dropout=0.0).eval()
    x = torch.randn(2, 10, 16)
    changed = x.clone()
    changed[:, 7:] += 5.0
    y, _ = block(x)
    y_changed, _ = block(changed)
    torch.testing.assert_close(y[:, :7], y_changed[:, :7])
    assert not torch.allclose(y[:, 7:], y_changed[:, 7:])


def test_masked_attention_is_finite_in_half_precision():
    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(16, 4, 32, dropout=0.0).eval().to(torch.bfloat16)
    _, weights = block(torch.randn(2, 10, 16, dtype=torch.bfloat16) * 50, need_weights=True)
    assert torch.isfinite(weights).all()
    assert float(weights.detach().float().triu(1).abs().max()) == 0.0


def test_batched_variable_selection_equals_a_loop_over_variables():
    torch.manual_seed(0)
    vsn = VariableSelection(num_vars=3, var_hidden=4, d_model=8, dropout=0.0, context_dim=8).eval()
    with torch.no_grad():   # per-variable values everywhere, so that a mixed-up variable axis shows
        for param in (vsn.embed_bias, vsn.b_in, vsn.b_gate, vsn.norm_weight, vsn.norm_bias):
            param.normal_()
    x = torch.randn(2, 5, 3)
    context = torch.randn(2, 8)
    selected, weights = vsn(x, context)
    processed = []
    for j in range(3):   # reference: each variable's own GRN, one at a time
        emb = x[..., j:j + 1] * vsn.embed_weight[j] + vsn.embed_bias[j]
        hidden = torch.nn.functional.elu(emb @ vsn.w_in[j] + vsn.b_in[j])
        gated = torch.nn.functional.glu(hidden @ vsn.w_gate[j] + vsn.b_gate[j], dim=-1)
        normed = torch.nn.functional.layer_norm(emb + gated, (4,)) * vsn.norm_weight[j] + vsn.norm_bias[j]
        processed.append(normed * weights[..., j:j + 1])
    expected = vsn.project(torch.cat(processed, dim=-1))
    torch.testing.assert_close(selected, expected, atol=1e-5, rtol=1e-5)


def test_prediction_keeps_quantiles_ordered(small_raw):
    small_raw["task"] = "quantile"
    model = build_model(build_config(small_raw), DIMS)
    pred = model.head.predict(torch.tensor([[0.5, -1.0, 2.0]]))
    assert pred.tolist() == [[-1.0, 0.5, 2.0]]


def test_last_block_on_the_last_position_alone_gives_the_same_output(small_raw):
    """The shortcut of the last block changes the work, not the maths: compare with every position computed."""
    small_raw["model"]["num_transformer_blocks"] = 2
    torch.manual_seed(0)
    model = build_model(build_config(small_raw), DIMS).eval()
    observed, known, symbol = _inputs()
    fast = model(observed, known, symbol).output
    full = model(observed, known, symbol, return_weights=True).output   # every block over every position
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    block = model.blocks[-1]
    x = torch.randn(3, 9, block.qkv.in_features)
    torch.testing.assert_close(block(x, last_only=True)[0], block(x)[0][:, -1:], atol=1e-5, rtol=1e-5)
