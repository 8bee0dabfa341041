import pytest
import torch

from enhanced_tft.config import build_config
from enhanced_tft.model.layers import Dropout, VariableSelection, _PerVariableGRN, dropout_mask
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
    # the hand-written backward gives autograd's gradients of the loop, for every parameter
    target = torch.randn_like(selected)
    grads = torch.autograd.grad((selected * target).sum() + weights.square().sum(), list(vsn.parameters()),
                                retain_graph=True)
    reference = torch.autograd.grad((expected * target).sum() + weights.square().sum(), list(vsn.parameters()))
    for (name, _), got, want in zip(vsn.named_parameters(), grads, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("with_mask", [False, True])
def test_per_variable_grn_backward_matches_finite_differences(with_mask):
    """gradcheck in float64: every input's gradient against central differences (mask: fixed dropout)."""
    g = torch.Generator().manual_seed(3)
    num_vars, rows, width, d_model = 3, 7, 4, 5

    def param(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    mask = (torch.rand(num_vars, rows, width, generator=g) > 0.3).double() / 0.7 if with_mask else None
    inputs = (torch.randn(rows, num_vars, generator=g, dtype=torch.float64),
              torch.rand(rows, num_vars, generator=g, dtype=torch.float64).requires_grad_(),
              param(num_vars, width), param(num_vars, width), param(num_vars, width, 2 * width),
              param(num_vars, 2 * width), param(num_vars, width), param(num_vars, width),
              param(d_model, num_vars * width), mask)
    assert torch.autograd.gradcheck(_PerVariableGRN.apply, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)


def test_variable_selection_dropout_is_the_mask_it_draws():
    """In training, each GRN's hidden layer is multiplied by the mask dropout_mask draws from torch's generator:
    the same seed gives the same mask, and the loop reference with that mask gives the same output."""
    torch.manual_seed(0)
    vsn = VariableSelection(num_vars=3, var_hidden=4, d_model=8, dropout=0.5, context_dim=8).train()
    vsn.selector.gate.dropout.p = 0.0       # the selector draws nothing: the layer's one draw is its mask
    with torch.no_grad():
        for param in (vsn.embed_bias, vsn.b_in, vsn.b_gate, vsn.norm_weight, vsn.norm_bias):
            param.normal_()
    x, context = torch.randn(2, 5, 3), torch.randn(2, 8)
    torch.manual_seed(11)
    selected, weights = vsn(x, context)
    torch.manual_seed(11)
    mask = dropout_mask((3, 10, 4), 0.5, x, torch.float32)    # (F, B*T, H)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    processed = []
    for j in range(3):
        emb = x[..., j:j + 1] * vsn.embed_weight[j] + vsn.embed_bias[j]
        hidden = torch.nn.functional.elu(emb @ vsn.w_in[j] + vsn.b_in[j]) * mask[j].view(2, 5, 4)
        gated = torch.nn.functional.glu(hidden @ vsn.w_gate[j] + vsn.b_gate[j], dim=-1)
        normed = torch.nn.functional.layer_norm(emb + gated, (4,)) * vsn.norm_weight[j] + vsn.norm_bias[j]
        processed.append(normed * weights[..., j:j + 1])
    torch.testing.assert_close(selected, vsn.project(torch.cat(processed, dim=-1)), atol=1e-5, rtol=1e-5)


def test_dropout_mask_rate_scale_and_seeding():
    cpu = torch.empty(0)    # a CPU tensor: where the masks are drawn
    for p in (0.1, 0.3):
        torch.manual_seed(5)
        mask = dropout_mask((1000, 1000), p, cpu, torch.float32)
        kept = mask != 0
        steps = round(p * 65536)
        # one million Bernoulli draws: the dropped fraction is within 5 standard deviations (0.0023 at p=0.3) of p
        assert abs(1 - kept.float().mean().item() - p) < 5 * (p * (1 - p) / 1e6) ** 0.5
        assert torch.equal(mask[kept].unique(), torch.tensor([65536 / (65536 - steps)]))   # inverted scale
        torch.manual_seed(5)
        assert torch.equal(dropout_mask((1000, 1000), p, cpu, torch.float32), mask)      # same seed, same mask
        assert not torch.equal(dropout_mask((1000, 1000), p, cpu, torch.float32), mask)  # the generator moved on
    assert dropout_mask((3, 4), 1.0, cpu, torch.float32).abs().sum() == 0
    assert torch.equal(dropout_mask((3, 4), 0.0, cpu, torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16))
    layer = Dropout(0.3).train()
    x = torch.randn(500, 400, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y / x).detach().nan_to_num(0.0), atol=1e-5, rtol=1e-5)  # grad = mask
    assert layer.eval()(x) is x


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


def test_variable_selection_under_bf16_autocast_stays_close_to_fp32():
    """The GPU's default precision, run on the CPU: bf16 activations inside the Function, float32 gradients
    for the float32 parameters, within bf16's rounding (8 bits of mantissa) of the fp32 ones."""
    torch.manual_seed(0)
    vsn = VariableSelection(num_vars=6, var_hidden=8, d_model=16, dropout=0.0, context_dim=16).train()
    x, context = torch.randn(4, 10, 6), torch.randn(4, 16)
    target = torch.randn(4, 10, 16)
    grads = {}
    for precision in ("fp32", "bf16"):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            selected, weights = vsn(x, context)
        assert selected.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        loss = (selected.float() * target).sum()
        grads[precision] = torch.autograd.grad(loss, list(vsn.parameters()))
    for (name, param), full, half in zip(vsn.named_parameters(), grads["fp32"], grads["bf16"]):
        assert half.dtype == torch.float32 and torch.isfinite(half).all(), name
        assert (half - full).norm() <= 0.05 * full.norm() + 1e-6, name
