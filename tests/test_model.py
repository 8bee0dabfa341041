import pytest
import torch

from enhanced_tft import tasks
from enhanced_tft.config.schema import build_config
from enhanced_tft.model.build import build_model, load_model, move_to_device
from enhanced_tft.model.layers import (Dropout, VariableSelection, _PerVariableGRN, _torch_dropout_mask, dropout_mask,
                                       fast_cpu_kernels_default, set_fast_cpu_kernels)
from enhanced_tft.model.tft import CausalSelfAttentionBlock, ModelDims

DIMS = ModelDims(num_observed=5, num_known=4, num_symbols=3, horizon=1)
# the two positions of the CPU fast-path switch, and the dropout mask each draws
POSITIONS = {"fast": dropout_mask, "plain": _torch_dropout_mask}


def _inputs(batch=6, steps=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, steps, DIMS.num_observed, generator=g),
            torch.randn(batch, steps + DIMS.horizon, DIMS.num_known, generator=g),
            torch.randint(0, DIMS.num_symbols, (batch,), generator=g))


def _model(raw: dict):
    cfg = build_config(raw)
    return build_model(cfg.model, DIMS, tasks.for_config(cfg).output_size)


def _selection(num_vars=3, var_hidden=4, d_model=8, dropout=0.0, position="fast") -> VariableSelection:
    """A variable selection layer with per-variable values everywhere, so that a mixed-up variable axis shows."""
    vsn = VariableSelection(num_vars, var_hidden, d_model, dropout, context_dim=d_model)
    with torch.no_grad():
        for param in (vsn.embed_bias, vsn.b_in, vsn.b_gate, vsn.norm_weight, vsn.norm_bias):
            param.normal_()
    return set_fast_cpu_kernels(vsn, position == "fast")


def _loop_reference(vsn: VariableSelection, x, weights, mask=None):
    """Each variable's own GRN, one at a time, weighted and projected (mask: (F, B*T, H) dropout of the hidden)."""
    batch, steps, num_vars = x.shape
    processed = []
    for j in range(num_vars):
        emb = x[..., j:j + 1] * vsn.embed_weight[j] + vsn.embed_bias[j]
        hidden = torch.nn.functional.elu(emb @ vsn.w_in[j] + vsn.b_in[j])
        if mask is not None:
            hidden = hidden * mask[j].view(batch, steps, -1)
        gated = torch.nn.functional.glu(hidden @ vsn.w_gate[j] + vsn.b_gate[j], dim=-1)
        normed = torch.nn.functional.layer_norm(emb + gated, (vsn.var_hidden,)) * vsn.norm_weight[j] + vsn.norm_bias[j]
        processed.append(normed * weights[..., j:j + 1])
    return vsn.project(torch.cat(processed, dim=-1))


@pytest.mark.parametrize("task, width", [("regression", 1), ("quantile", 3), ("classification_binary", 1),
                                         ("classification_multiclass", 3)])
def test_output_shapes_and_float32_heads(task, width, small_raw):
    small_raw["task"] = task
    torch.manual_seed(0)
    model = _model(small_raw)
    out = model(*_inputs())
    assert out.output.shape == (6, width) and out.output.dtype == torch.float32
    assert out.observed_weights is None and out.attention is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16 = model(*_inputs())
    assert out16.output.dtype == torch.float32           # the head leaves autocast
    loss = tasks.for_config(build_config(small_raw)).loss(out16.output, torch.zeros(6))
    assert loss.dtype == torch.float32 and loss.shape == (6,)


def test_weights_only_when_asked_and_they_are_distributions(small_raw):
    torch.manual_seed(0)
    model = _model(small_raw).eval()
    plain = model(*_inputs())
    out = model(*_inputs(), return_weights=True)
    assert torch.equal(plain.output, out.output)     # the weights are computed beside the attention, not in it
    assert out.observed_weights.shape == (6, 12, DIMS.num_observed + DIMS.num_known)
    assert out.future_weights.shape == (6, 1, DIMS.num_known)
    torch.testing.assert_close(out.observed_weights.sum(-1), torch.ones(6, 12))
    attention = out.attention[0]
    assert attention.shape == (6, 2, 13) and attention.dtype == torch.float32   # the last position's row, per head
    torch.testing.assert_close(attention.sum(-1), torch.ones(6, 2))
    assert float(attention.detach().min()) >= 0.0


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


def test_attention_weights_are_finite_in_half_precision():
    torch.manual_seed(0)
    block = CausalSelfAttentionBlock(16, 4, 32, dropout=0.0).eval().to(torch.bfloat16)
    _, weights = block(torch.randn(2, 10, 16, dtype=torch.bfloat16) * 50, need_weights=True)
    assert weights.shape == (2, 4, 10) and torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4))


@pytest.mark.parametrize("position", POSITIONS)
def test_batched_variable_selection_equals_a_loop_over_variables(position):
    torch.manual_seed(0)
    vsn = _selection(position=position).eval()
    x = torch.randn(2, 5, 3)
    context = torch.randn(2, 8)
    selected, weights = vsn(x, context)
    expected = _loop_reference(vsn, x, weights)
    torch.testing.assert_close(selected, expected, atol=1e-5, rtol=1e-5)
    # either backward (hand-written or autograd's) gives autograd's gradients of the loop, for every parameter
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


@pytest.mark.parametrize("position", POSITIONS)
def test_variable_selection_dropout_is_the_mask_it_draws(position):
    """In training, each GRN's hidden layer is multiplied by the mask its switch position draws from torch's
    generator: the same seed gives the same mask, and the loop reference with that mask gives the same output."""
    torch.manual_seed(0)
    vsn = _selection(dropout=0.5, position=position).train()
    vsn.selector.gate.dropout.p = 0.0       # the selector draws nothing: the layer's one draw is its mask
    x, context = torch.randn(2, 5, 3), torch.randn(2, 8)
    torch.manual_seed(11)
    selected, weights = vsn(x, context)
    torch.manual_seed(11)
    mask = POSITIONS[position]((3, 10, 4), 0.5, torch.float32, x.device)    # (F, B*T, H)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    torch.testing.assert_close(selected, _loop_reference(vsn, x, weights, mask), atol=1e-5, rtol=1e-5)


def test_dropout_mask_rate_scale_and_seeding():
    for p in (0.1, 0.3):
        torch.manual_seed(5)
        mask = dropout_mask((1000, 1000), p, torch.float32)
        kept = mask != 0
        steps = round(p * 65536)
        # one million Bernoulli draws: the dropped fraction is within 5 standard deviations (0.0023 at p=0.3) of p
        assert abs(1 - kept.float().mean().item() - p) < 5 * (p * (1 - p) / 1e6) ** 0.5
        assert torch.equal(mask[kept].unique(), torch.tensor([65536 / (65536 - steps)]))   # inverted scale
        torch.manual_seed(5)
        assert torch.equal(dropout_mask((1000, 1000), p, torch.float32), mask)      # same seed, same mask
        assert not torch.equal(dropout_mask((1000, 1000), p, torch.float32), mask)  # the generator moved on
    assert dropout_mask((3, 4), 1.0, torch.float32).abs().sum() == 0
    assert torch.equal(dropout_mask((3, 4), 0.0, torch.bfloat16), torch.ones(3, 4, dtype=torch.bfloat16))
    layer = Dropout(0.3).train()
    x = torch.randn(500, 400, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, (y / x).detach().nan_to_num(0.0), atol=1e-5, rtol=1e-5)  # grad = mask
    assert layer.eval()(x) is x


def test_plain_position_is_a_valid_dropout():
    """Switch off: Dropout is torch's F.dropout and variable selection's mask torch's Bernoulli draw. Both drop
    a fraction p (within 5 standard deviations of a million draws), scale the rest by exactly 1 / (1 - p) in
    float32, follow torch's seed, and pass the gradient through the mask alone."""
    p = 0.3
    tolerance = 5 * (p * (1 - p) / 1e6) ** 0.5     # 0.0023
    layer = set_fast_cpu_kernels(Dropout(p), False).train()
    x = torch.ones(1000, 1000, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    mask = _torch_dropout_mask((1000, 1000), p, torch.float32, x.device)
    for drawn in (y.detach(), mask):
        kept = drawn != 0
        assert abs(1 - kept.float().mean().item() - p) < tolerance
        torch.testing.assert_close(drawn[kept].unique(), torch.tensor([1 / (1 - p)]), atol=0.0, rtol=1e-6)
    torch.manual_seed(5)
    assert torch.equal(layer(x).detach(), y.detach())                   # same seed, same mask
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())                                # x = 1: the gradient is the mask
    assert _torch_dropout_mask((3, 4), 1.0, torch.float32, x.device).abs().sum() == 0


def test_the_switch_has_a_default_per_device_and_leaves_the_weights_alone(small_raw):
    assert fast_cpu_kernels_default(torch.device("cpu")) and fast_cpu_kernels_default("cpu")
    assert not fast_cpu_kernels_default(torch.device("cuda")) and not fast_cpu_kernels_default("meta")
    small_raw["model"]["dropout_rate"] = 0.1
    model = _model(small_raw)

    def flags(module):
        return [m.fast_cpu_kernels for m in module.modules() if isinstance(m, (Dropout, VariableSelection))]

    # 4 static-context GRNs, 2 selections x (the layer, its dropout, its selector's), the LSTM gate, the
    # enrichment, and the block's attention gate and feed-forward: 14 switched layers
    assert flags(model) == [True] * 14                  # built on the CPU: the CPU's default
    names = list(model.state_dict())
    assert set_fast_cpu_kernels(model, False) is model and flags(model) == [False] * 14
    assert list(model.state_dict()) == names            # a plain attribute, not a buffer: checkpoints unchanged
    assert flags(move_to_device(model, "cpu")) == [True] * 14
    moved = move_to_device(_model(small_raw), torch.device("meta"))   # any device but the CPU: the fast paths off
    assert flags(moved) == [False] * 14 and next(moved.parameters()).device.type == "meta"
    cfg = build_config(small_raw)
    loaded = load_model(cfg.model, DIMS, 1, model.state_dict(), torch.device("cpu"))
    assert flags(loaded) == [True] * 14 and not loaded.training
    from enhanced_tft.model.build import build_training_model
    task = tasks.for_config(cfg)
    assert flags(build_training_model(cfg, task, DIMS)) == [True] * 14
    assert flags(build_training_model(cfg, task, DIMS, torch.device("meta"))) == [False] * 14


def test_switch_positions_agree_on_variable_selection_without_dropout():
    """Same function: the forward to the bit (same ops in the same order), parameter gradients within 1e-5 in
    float32 (the hand-written backward sums in another order than autograd)."""
    torch.manual_seed(0)
    vsn = _selection(num_vars=5, var_hidden=8, d_model=16).train()
    x, context, target = torch.randn(4, 9, 5), torch.randn(4, 16), torch.randn(4, 9, 16)
    results = {}
    for position in POSITIONS:
        set_fast_cpu_kernels(vsn, position == "fast")
        selected, weights = vsn(x, context)
        loss = (selected * target).sum() + weights.square().sum()
        results[position] = selected.detach(), torch.autograd.grad(loss, list(vsn.parameters()))
    assert torch.equal(results["fast"][0], results["plain"][0])
    for (name, _), fast, plain in zip(vsn.named_parameters(), results["fast"][1], results["plain"][1]):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("checkpointing", ["none", "all"])
def test_switch_positions_agree_on_the_whole_model_without_dropout(small_raw, checkpointing):
    small_raw["model"]["num_transformer_blocks"] = 2
    torch.manual_seed(0)
    model = _model(small_raw).train()
    model.activation_checkpointing = checkpointing
    inputs = _inputs()
    results = {}
    for position in POSITIONS:
        set_fast_cpu_kernels(model, position == "fast")
        output = model(*inputs).output
        results[position] = output.detach(), torch.autograd.grad(output.square().sum(), list(model.parameters()))
    torch.testing.assert_close(results["fast"][0], results["plain"][0], atol=1e-6, rtol=0.0)
    for (name, _), fast, plain in zip(model.named_parameters(), results["fast"][1], results["plain"][1]):
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5, msg=name)


def test_prediction_keeps_quantiles_ordered(small_raw):
    small_raw["task"] = "quantile"
    pred = tasks.for_config(build_config(small_raw)).predict(torch.tensor([[0.5, -1.0, 2.0]]))
    assert pred.tolist() == [[-1.0, 0.5, 2.0]]


def test_last_block_on_the_last_position_alone_gives_the_same_output(small_raw, monkeypatch):
    """The shortcut of the last block changes the work, not the maths: compare with every position computed."""
    small_raw["model"]["num_transformer_blocks"] = 2
    torch.manual_seed(0)
    model = _model(small_raw).eval()
    observed, known, symbol = _inputs()
    fast = model(observed, known, symbol).output
    block = model.blocks[-1]
    monkeypatch.setattr(block, "forward", lambda x, need_weights=False, last_only=False:
                        CausalSelfAttentionBlock.forward(block, x, need_weights))   # every position, every block
    full = model(observed, known, symbol).output
    monkeypatch.undo()
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)
    x = torch.randn(3, 9, block.qkv.in_features)
    torch.testing.assert_close(block(x, last_only=True)[0], block(x)[0][:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("position", POSITIONS)
def test_variable_selection_under_bf16_autocast_stays_close_to_fp32(position):
    """The GPU's default precision, run on the CPU: bf16 activations inside the layer, float32 gradients
    for the float32 parameters, within bf16's rounding (8 bits of mantissa) of the fp32 ones."""
    torch.manual_seed(0)
    vsn = VariableSelection(num_vars=6, var_hidden=8, d_model=16, dropout=0.0, context_dim=16).train()
    set_fast_cpu_kernels(vsn, position == "fast")
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


def test_the_linear_skip_adds_a_linear_map_of_the_last_bars_inputs(small_raw):
    """model.linear_skip: output = head(body) + W x observed[:, -1] + b. With the head zeroed the output is that
    linear map alone, to the bit; without the skip the model has no such weights and reads the body only."""
    model = _model({**small_raw, "task": "quantile"}).eval()
    observed, known, symbol = _inputs(batch=5)
    with torch.no_grad():
        model.head.linear.weight.zero_()
        model.head.linear.bias.zero_()
        out = model(observed, known, symbol).output
        assert torch.equal(out, model.skip.linear(observed[:, -1]))
        changed = observed.clone()
        changed[:, :-1] += 1.0                            # earlier bars reach the output through the body only
        assert torch.equal(model(changed, known, symbol).output, out)
    plain = _model({**small_raw, "task": "quantile", "model": {**small_raw["model"], "linear_skip": False}})
    assert plain.skip is None and not any(name.startswith("skip.") for name in plain.state_dict())
    assert {name for name in model.state_dict() if name.startswith("skip.")} == {"skip.linear.weight", "skip.linear.bias"}
    assert model.skip.linear.weight.shape == (3, DIMS.num_observed)


def test_a_run_saved_before_the_linear_skip_rebuilds_without_it(tmp_path, small_raw):
    """A config.yaml written before model.linear_skip existed ran without the skip: its weights have none, and
    the run rebuilds the model it trained (EARLIER_DEFAULTS), while a new config gets the skip by default."""
    import yaml

    from enhanced_tft.config.schema import load_run_config
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(small_raw))
    assert load_run_config(tmp_path / "config.yaml").model.linear_skip is False
    assert build_config(small_raw).model.linear_skip is True
