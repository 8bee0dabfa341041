"""Building blocks of the TFT: gated linear units, gated residual networks, batched variable selection.

Two CPU fast paths sit behind one switch, `set_fast_cpu_kernels(model, enabled)`, and compute the same function
either way (tests/test_model.py compares them):
  * dropout masks drawn with numpy's PCG64 from a seed out of torch's generator (dropout_mask), instead of
    torch's per-element Bernoulli draws;
  * variable selection's per-variable GRNs in one autograd Function with a hand-written backward
    (_PerVariableGRN), instead of plain autograd ops.
The stated default, fast_cpu_kernels_default(device): on for the CPU, where both were measured as wins (masks
several times cheaper to draw, the layer's backward far fewer passes over its (F, N, H) tensors;
docs/performance.md); off elsewhere, since both answer CPU costs: a GPU's dropout is already one fused kernel,
a numpy mask would have to cross from the host, and plain autograd there keeps only a few percent more
activations (4% for seed_original). A freshly built model has it on, since models are built on the CPU;
whoever moves a model to another device applies that device's default (model/build.py move_to_device). The
masks differ between the two positions (another generator), their distribution does not. Nothing here asks
who runs the model: the memory planner, whose fake tensors have no value to seed numpy with, turns the
switch off itself (training/planner.py).

Legend: B batch, T time steps, F input variables, H per-variable hidden width, D d_model.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def fast_cpu_kernels_default(device: torch.device | str) -> bool:
    """The switch's stated default for a device: on for the CPU, off elsewhere (see the module docstring)."""
    return torch.device(device).type == "cpu"


def set_fast_cpu_kernels(model: nn.Module, enabled: bool) -> nn.Module:
    """Turn the CPU fast paths (numpy dropout masks, variable selection's hand-written backward) on or off in
    every layer of `model`; the same function either way, so weights and checkpoints do not depend on it."""
    for module in model.modules():
        if isinstance(module, (Dropout, VariableSelection)):
            module.fast_cpu_kernels = bool(enabled)
    return model


def dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Inverted-dropout mask of `shape`: 0 where an element is dropped (probability p), 1 / (1 - p) where kept.

    On the CPU, torch draws one Mersenne-Twister number per element (about 13 ns each here). This draws one 64-bit
    seed from torch's default CPU generator, expands it with numpy's PCG64 into 16-bit uniform integers and
    compares them with a threshold straight into the mask's dtype: p is rounded to a multiple of 1/65536
    (0.1 -> 0.100006), at about a fifth of the cost. Seeds (torch.manual_seed) and activation checkpointing's
    recomputation (which restores torch's generator state) give the same masks, since the seed comes from
    torch's generator. A float mask (not a boolean one) because torch's CPU kernels multiply by it about
    three times faster than they select with a boolean. The mask is made on the CPU and copied to `device`.
    """
    steps = min(round(p * 65536), 65536)
    if steps == 65536:
        return torch.zeros(shape, device=device, dtype=dtype)
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    uniform = np.random.PCG64(seed).random_raw((count + 3) // 4).view(np.int16)[:count]   # -32768..32767
    mask = torch.empty(shape, dtype=dtype)
    # P(u >= steps - 32768) = (65536 - steps) / 65536 = 1 - p
    torch.ge(torch.from_numpy(uniform).view(shape), steps - 32768, out=mask)
    if steps:
        mask.mul_(65536 / (65536 - steps))
    return mask.to(device)


def _torch_dropout_mask(shape: tuple[int, ...], p: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The inverted-dropout mask drawn by torch's own Bernoulli kernel (any device, fake tensors included)."""
    if p >= 1.0:
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype).bernoulli_(1 - p).div_(1 - p)


class Dropout(nn.Module):
    """nn.Dropout; with the fast CPU kernels on, its mask comes from dropout_mask (backward keeps the mask alone,
    as for nn.Dropout), else F.dropout."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        self.fast_cpu_kernels = True     # set_fast_cpu_kernels(); on: the CPU's default, where models are built

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if not self.fast_cpu_kernels:
            return F.dropout(x, self.p, True)
        return x * dropout_mask(tuple(x.shape), self.p, x.dtype, x.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GatedLinearUnit(nn.Module):
    """Linear to 2x width, then value * sigmoid(gate): lets a block switch itself off."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = Dropout(dropout)
        self.proj = nn.Linear(in_dim, 2 * out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.glu(self.proj(self.dropout(x)), dim=-1)


class GatedResidualNetwork(nn.Module):
    """GRN(a, c) = LayerNorm(skip(a) + GLU(W1 ELU(W2 a + W3 c))) of Lim et al., on the last axis."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        self.skip = nn.Linear(in_dim, out_dim) if in_dim != out_dim else nn.Identity()
        self.fc_in = nn.Linear(in_dim, hidden_dim)
        self.fc_context = nn.Linear(context_dim, hidden_dim, bias=False) if context_dim else None
        self.fc_hidden = nn.Linear(hidden_dim, hidden_dim)
        self.gate = GatedLinearUnit(hidden_dim, out_dim, dropout)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, a: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.fc_in(a)
        if context is not None and self.fc_context is not None:
            # context: (B, C) broadcast over the time axis of a: (B, T, in)
            ctx = self.fc_context(context)
            hidden = hidden + (ctx.unsqueeze(1) if hidden.dim() == 3 else ctx)
        hidden = self.fc_hidden(F.elu(hidden))
        return self.norm(self.skip(a) + self.gate(hidden))


class VariableSelection(nn.Module):
    """TFT variable selection with every variable's GRN computed in one batched op (no loop over F).

    Each scalar input j is embedded to H, passed through its own GRN (weights stacked as (F, H, H)),
    weighted by a softmax over variables, and the weighted set is projected to D in one matmul.
    Selection weights come from a GRN over the raw inputs and the static context, which costs
    O(F*D) per step instead of the O(F*H*D) of flattening all embeddings.
    With the fast CPU kernels on, the per-variable GRNs, the weighting and the projection run in one autograd
    Function (_PerVariableGRN) with a hand-written backward; off, the same ops run under plain autograd.
    """

    def __init__(self, num_vars: int, var_hidden: int, d_model: int, dropout: float, context_dim: int):
        super().__init__()
        self.num_vars, self.var_hidden = num_vars, var_hidden
        scale = var_hidden ** -0.5
        self.embed_weight = nn.Parameter(torch.randn(num_vars, var_hidden))           # (F, H)
        self.embed_bias = nn.Parameter(torch.zeros(num_vars, var_hidden))             # (F, H)
        self.w_in = nn.Parameter(torch.randn(num_vars, var_hidden, var_hidden) * scale)  # (F, H, H)
        self.b_in = nn.Parameter(torch.zeros(num_vars, var_hidden))
        self.w_gate = nn.Parameter(torch.randn(num_vars, var_hidden, 2 * var_hidden) * scale)
        self.b_gate = nn.Parameter(torch.zeros(num_vars, 2 * var_hidden))
        self.norm_weight = nn.Parameter(torch.ones(num_vars, var_hidden))
        self.norm_bias = nn.Parameter(torch.zeros(num_vars, var_hidden))
        self.dropout = Dropout(dropout)
        self.selector = GatedResidualNetwork(num_vars, d_model, num_vars, dropout, context_dim)
        self.project = nn.Linear(num_vars * var_hidden, d_model)
        self.fast_cpu_kernels = True     # set_fast_cpu_kernels(); on: the CPU's default, where models are built

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, F), context: (B, C) -> selected (B, T, D), weights (B, T, F)."""
        # the (F, N, H) tensors (N = B*T) dominate this layer's time and memory: build them in the autocast
        # dtype, since elementwise ops would otherwise keep them in float32 and save them for backward at full width
        dtype = compute_dtype(x)
        batch, steps, num_vars = x.shape
        embed_weight, embed_bias, w_in = self.embed_weight.to(dtype), self.embed_bias.to(dtype), self.w_in.to(dtype)
        # each GRN's first layer acts on an embedding that is affine in its scalar input, so the two fold into
        # one affine map of x: (x e + c) W + b = x (e W) + (c W + b). Same function, and no (F, N, H) x (H, H)
        # matmul; the parameters (and what they mean) stay as they are
        slope = torch.bmm(embed_weight.unsqueeze(1), w_in).squeeze(1)                          # (F, H)
        offset = torch.baddbmm(self.b_in.to(dtype).unsqueeze(1), embed_bias.unsqueeze(1), w_in).squeeze(1)
        weights = torch.softmax(self.selector(x, context), dim=-1)                          # (B, T, F)
        # each variable's norm scale g and shift s fold into the projection P, on weights instead of activations:
        # sum_f w_f (n_f g_f + s_f) P_f = (n w) (g P) + w (s P)
        weight = self.project.weight                                                        # (D, F*H)
        scaled = (weight * self.norm_weight.reshape(1, -1)).to(dtype)
        shift = (weight.view(-1, num_vars, self.var_hidden) * self.norm_bias).sum(-1)       # (D, F)
        mask = None          # dropout on each GRN's hidden layer
        if self.training and self.dropout.p > 0.0:
            draw = dropout_mask if self.fast_cpu_kernels else _torch_dropout_mask
            mask = draw((num_vars, batch * steps, self.var_hidden), self.dropout.p, dtype, x.device)
        per_variable = _PerVariableGRN.apply if self.fast_cpu_kernels else _per_variable_autograd
        weights_nf = weights.to(dtype).reshape(batch * steps, num_vars)
        selected = per_variable(x.to(dtype).reshape(batch * steps, num_vars), weights_nf, slope, offset,
                                self.w_gate.to(dtype), self.b_gate.to(dtype), embed_weight, embed_bias, scaled, mask)
        selected = selected.view(batch, steps, -1) + F.linear(weights.to(dtype), shift.to(dtype),
                                                              self.project.bias.to(dtype))
        return selected, weights


def _per_variable_forward(x_fn, slope, offset, w_gate, b_gate, embed_weight, embed_bias, mask):
    """Every variable's GRN without its norm's affine part: (F, N, 1) inputs -> the tensors backward needs.

    hidden = ELU(x slope + offset); z = (hidden * mask) W_gate + b_gate; res = GLU(z) + x e + c;
    normed = (res - mean) * rstd over the last axis. All (F, N, H) except z (F, N, 2H), mean/rstd (F, N, 1).
    """
    hidden = F.elu_(torch.addcmul(offset.unsqueeze(1), x_fn, slope.unsqueeze(1)))
    dropped = hidden if mask is None else hidden * mask
    z = torch.baddbmm(b_gate.unsqueeze(1), dropped, w_gate)
    res = F.glu(z, dim=-1).addcmul_(x_fn, embed_weight.unsqueeze(1)).add_(embed_bias.unsqueeze(1))
    normed, mean, rstd = torch.native_layer_norm(res, (res.shape[-1],), None, None, 1e-5)
    return hidden, dropped, z, res, normed, mean, rstd


def _weighted_flat(normed: torch.Tensor, weights_fn: torch.Tensor) -> torch.Tensor:
    """normed (F, N, H) times the selection weights (F, N, 1), written straight into the (N, F*H) layout."""
    num_vars, rows, hidden = normed.shape
    flat = torch.empty(rows, num_vars, hidden, dtype=normed.dtype, device=normed.device)
    torch.mul(normed, weights_fn, out=flat.transpose(0, 1))
    return flat.view(rows, num_vars * hidden)


def _per_variable_autograd(x, weights, slope, offset, w_gate, b_gate, embed_weight, embed_bias, projection, mask):
    """_PerVariableGRN's forward under plain autograd: the same ops in the same order, so the same output."""
    with torch.autocast(x.device.type, enabled=False):   # everything is in one dtype already
        x_fn, weights_fn = x.t().unsqueeze(-1), weights.t().unsqueeze(-1)                       # (F, N, 1)
        normed = _per_variable_forward(x_fn, slope, offset, w_gate, b_gate, embed_weight, embed_bias, mask)[4]
        # _weighted_flat's products; its out= write into the (N, F*H) layout is one autograd cannot follow
        flat = (normed * weights_fn).transpose(0, 1).reshape(x.shape[0], -1)
        return torch.mm(flat, projection.t())                                                   # (N, D)


class _PerVariableGRN(torch.autograd.Function):
    """The per-variable GRNs, their selection weighting and the projection, with a hand-written backward.

    forward(x (N, F), weights (N, F), slope (F, H), offset (F, H), w_gate (F, H, 2H), b_gate (F, 2H),
    embed_weight (F, H), embed_bias (F, H), projection (D, F*H), mask (F, N, H) dropout mask or None) -> (N, D).
    Autograd would save about ten (F, N, H) tensors and run some thirty elementwise passes over them, several
    on transposed or type-converted copies. This saves five (hidden, z counted twice, res, normed) and the
    mask, writes the weighted set straight into the projection's layout, uses torch's fused GLU, ELU and
    LayerNorm backward kernels, and does the reductions over N as batched matmuls. x gets no gradient (data).
    """

    @staticmethod
    def forward(ctx, x, weights, slope, offset, w_gate, b_gate, embed_weight, embed_bias, projection, mask):
        with torch.autocast(x.device.type, enabled=False):   # everything is in one dtype already
            x_fn, weights_fn = x.t().unsqueeze(-1), weights.t().unsqueeze(-1)                   # (F, N, 1)
            hidden, _, z, res, normed, mean, rstd = _per_variable_forward(
                x_fn, slope, offset, w_gate, b_gate, embed_weight, embed_bias, mask)
            out = torch.mm(_weighted_flat(normed, weights_fn), projection.t())                  # (N, D)
        ctx.save_for_backward(x, weights, w_gate, projection, mask, hidden, z, res, normed, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weights, w_gate, projection, mask, hidden, z, res, normed, mean, rstd = ctx.saved_tensors
        rows, num_vars = x.shape
        width = hidden.shape[-1]
        # each (F, N, H) temporary is dropped as soon as the next one exists: at most three are alive at once
        with torch.autocast(x.device.type, enabled=False):
            grad_out = grad_out.to(x.dtype)
            weights_fn = weights.t().unsqueeze(-1)
            grad_projection = torch.mm(grad_out.t(), _weighted_flat(normed, weights_fn))      # (D, F*H)
            grad_flat = torch.mm(grad_out, projection).view(rows, num_vars, width)             # (N, F, H)
            # sum over H as a matrix-vector product: a reduction over a last axis of 16 is slow on the CPU
            grad_weights = torch.mv((grad_flat * normed.transpose(0, 1)).reshape(-1, width),
                                    normed.new_ones(width)).view(rows, num_vars)               # (N, F)
            grad_normed = torch.empty_like(normed)
            torch.mul(grad_flat.transpose(0, 1), weights_fn, out=grad_normed)                  # (F, N, H)
            del grad_flat
            grad_res = torch.ops.aten.native_layer_norm_backward(
                grad_normed, res, [width], mean, rstd, None, None, [True, False, False])[0]
            del grad_normed
            # sums over N of g * x and of g, for every variable at once: [x; 1] (F, 2, N) @ g (F, N, H)
            x_one = torch.stack([x.t(), torch.ones_like(x.t())], dim=1)                        # (F, 2, N)
            grad_embed = torch.bmm(x_one, grad_res)                                            # (F, 2, H)
            grad_z = torch.ops.aten.glu_backward(grad_res, z, -1)                              # (F, N, 2H)
            del grad_res
            dropped = hidden if mask is None else hidden * mask
            grad_w_gate = torch.bmm(dropped.transpose(1, 2), grad_z)                           # (F, H, 2H)
            del dropped
            grad_b_gate = grad_z.sum(1)                                                        # (F, 2H)
            grad_hidden = torch.bmm(grad_z, w_gate.transpose(1, 2))                            # (F, N, H)
            del grad_z
            if mask is not None:
                grad_hidden.mul_(mask)
            grad_pre = torch.ops.aten.elu_backward(grad_hidden, 1.0, 1, 1, True, hidden)
            del grad_hidden
            grad_affine = torch.bmm(x_one, grad_pre)                                           # (F, 2, H)
        return (None, grad_weights, grad_affine[:, 0], grad_affine[:, 1], grad_w_gate, grad_b_gate,
                grad_embed[:, 0], grad_embed[:, 1], grad_projection, None)
