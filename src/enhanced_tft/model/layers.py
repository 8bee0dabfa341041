"""Building blocks of the TFT: gated linear units, gated residual networks, batched variable selection.

Legend: B batch, T time steps, F input variables, H per-variable hidden width, D d_model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for x's device, else x's own dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class Dropout(nn.Module):
    """nn.Dropout with a cheaper mask on the CPU, where drawing the mask costs more than the rest of the layer.

    torch's CPU dropout draws one Bernoulli sample per element (~13 ns each here). This draws one 31-bit
    integer per two elements (torch's int32 random_() fills bits 0-30) and compares its low 16 bits and
    its high 15 bits with thresholds: a Bernoulli mask whose p is rounded to a multiple of 1/32768
    (0.1 -> 0.100006), scaled by 1/(1-p) as usual, at a third of the cost. It draws from the default CPU
    generator, so seeds and checkpoint recomputation (which restores that generator) give the same masks.
    Other devices use F.dropout, whose fused kernels are already cheap.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p
        steps = round(p * 32768)                      # p as a multiple of 1/32768
        # keep where the uniform low half (int16, -32768..32767) / high half (0..32767) clears its threshold
        self.register_buffer("_thresholds", torch.tensor([2 * steps - 32768, steps], dtype=torch.int16),
                             persistent=False)
        self._scale = 1.0 / (1.0 - steps / 32768) if steps < 32768 else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        count = x.numel()
        bits = torch.empty((count + 1) // 2, dtype=torch.int32).random_()        # bits 0-30 random, bit 31 zero
        halves = bits.view(torch.int16).view(-1, 2)                             # little-endian: (low, high)
        keep = (halves >= self._thresholds).view(-1)[:count].view(x.shape)
        return _MaskScale.apply(x, keep, self._scale)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _MaskScale(torch.autograd.Function):
    """x * keep * scale, saving only the boolean mask (one byte an element) for backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x, 0.0).mul_(scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0).mul_(ctx.scale), None, None


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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, F), context: (B, C) -> selected (B, T, D), weights (B, T, F)."""
        # the (F, N, H) tensors (N = B*T) dominate this layer's time and memory: build them in the autocast
        # dtype, since elementwise ops would otherwise keep them in float32 and save them for backward at full width
        dtype = compute_dtype(x)
        batch, steps, num_vars = x.shape
        x_fn = x.to(dtype).reshape(batch * steps, num_vars).t().unsqueeze(-1)              # (F, N, 1)
        embed_weight, embed_bias = self.embed_weight.to(dtype), self.embed_bias.to(dtype)
        # each GRN's first layer acts on an embedding that is affine in its scalar input, so the two fold into
        # one affine map of x: (x e + c) W + b = x (e W) + (c W + b). Same function, and no (F, N, H) x (H, H)
        # matmul; the parameters (and what they mean) stay as they are
        w_in = self.w_in.to(dtype)
        slope = torch.bmm(embed_weight.unsqueeze(1), w_in)                                 # (F, 1, H)
        offset = torch.baddbmm(self.b_in.to(dtype).unsqueeze(1), embed_bias.unsqueeze(1), w_in)   # (F, 1, H)
        hidden = F.elu(torch.addcmul(offset, x_fn, slope))                                  # (F, N, H)
        gated = F.glu(torch.baddbmm(self.b_gate.to(dtype).unsqueeze(1), self.dropout(hidden),
                                    self.w_gate.to(dtype)), dim=-1)                         # (F, N, H)
        emb = torch.addcmul(embed_bias.unsqueeze(1), x_fn, embed_weight.unsqueeze(1))       # (F, N, H)
        with torch.autocast(x.device.type, enabled=False):   # autocast would widen the norm to float32
            normed = F.layer_norm(emb + gated, (self.var_hidden,))                          # (F, N, H)
        weights = torch.softmax(self.selector(x, context), dim=-1)                          # (B, T, F)
        weighted = normed * weights.to(dtype).reshape(batch * steps, num_vars).t().unsqueeze(-1)   # (F, N, H)
        flat = weighted.transpose(0, 1).reshape(batch, steps, num_vars * self.var_hidden)  # (B, T, F*H)
        # each variable's norm scale g and shift s fold into the projection P, on weights instead of activations:
        # sum_f w_f (n_f g_f + s_f) P_f = (n w) (g P) + w (s P): one (F, N, H) tensor fewer to build and save
        weight = self.project.weight                                                        # (D, F*H)
        scaled = weight * self.norm_weight.reshape(1, -1)
        shift = (weight.view(-1, num_vars, self.var_hidden) * self.norm_bias).sum(-1)       # (D, F)
        return F.linear(flat, scaled, self.project.bias) + F.linear(weights.to(dtype), shift), weights
