"""Enhanced TFT: TFT front end (variable selection, static context, LSTM) + stacked causal attention blocks.

Legend: B batch, T past steps (sequence_length), H horizon steps, L = T + H, F variables, D d_model.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .heads import OutputHead
from .layers import GatedLinearUnit, GatedResidualNetwork, VariableSelection


@dataclass
class ModelDims:
    num_observed: int
    num_known: int
    num_symbols: int
    horizon: int


@dataclass
class TFTOutput:
    output: torch.Tensor                           # (B, O) raw head output, float32
    observed_weights: torch.Tensor | None = None   # (B, T, F_obs + F_known)
    future_weights: torch.Tensor | None = None     # (B, H, F_known)
    attention: list[torch.Tensor] | None = None    # per block: (B, heads, L) attention of the last position


class CausalSelfAttentionBlock(nn.Module):
    """Causal multi-head attention and a gated feed-forward, each with a gated residual and LayerNorm."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        # no bias: a key bias cannot change softmax, so its gradient is rounding noise that Adam would amplify
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model)
        self.attn_gate = GatedLinearUnit(d_model, d_model, dropout)
        self.attn_norm = nn.LayerNorm(d_model)
        self.ff = GatedResidualNetwork(d_model, ff_dim, d_model, dropout)

    def forward(self, x: torch.Tensor, need_weights: bool = False,
                last_only: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, L, D) -> (B, L, D), or (B, 1, D) for the last position alone when `last_only`; with
        `need_weights`, also the last position's attention weights (B, heads, L) (else None).

        `last_only` is for the last block, whose output the head reads at the last position only: keys and
        values still come from every position, but the query, output projection, gate and feed-forward
        run on one row instead of L (the same numbers for that row, a fraction of the work and memory).
        The weights are computed beside the attention, not instead of it: the outputs are the same to the
        bit with or without them.
        """
        batch, length, d_model = x.shape
        if last_only:
            q_weight, kv_weight = self.qkv.weight.split([d_model, 2 * d_model])
            k, v = F.linear(x, kv_weight).view(batch, length, 2, self.num_heads, -1).permute(2, 0, 3, 1, 4)
            x = x[:, -1:]                                                                     # (B, 1, D)
            q = F.linear(x, q_weight).view(batch, 1, self.num_heads, -1).transpose(1, 2)      # (B, h, 1, d)
            # the last query may see every position: no mask (is_causal would align it to the first key)
            attended = F.scaled_dot_product_attention(q, k, v)
            weights = _last_row_weights(q, k) if need_weights else None
            attended = self.out(attended.transpose(1, 2).reshape(batch, 1, d_model))
            x = self.attn_norm(x + self.attn_gate(attended))
            return self.ff(x), weights
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # 3x (B, h, L, d)
        # no dropout on the attention probabilities: without it the fused (flash) kernels run on CPU and GPU
        # alike and keep O(L) memory instead of saving (B, heads, L, L); dropout acts on the output instead
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        weights = _last_row_weights(q[:, :, -1:], k) if need_weights else None
        attended = self.out(attended.transpose(1, 2).reshape(batch, length, d_model))
        x = self.attn_norm(x + self.attn_gate(attended))
        return self.ff(x), weights


def _last_row_weights(q_last: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax attention of the last query (B, h, 1, d) over every key (B, h, L, d) -> (B, h, L), float32.

    The last position may see every earlier one, so its row needs no causal mask."""
    scores = (q_last.float() @ k.float().transpose(-2, -1)) * q_last.shape[-1] ** -0.5
    return torch.softmax(scores, dim=-1)[:, :, 0]


class EnhancedTFT(nn.Module):
    """Inputs: observed (B, T, F_obs), known (B, L, F_known), symbol (B,). Output: the head's (B, O).

    With `linear_skip`, the output adds a linear map of the last bar's observed inputs (as scaled) to the head's
    read-out of the body, as TiDE's global residual does: a linear rule on the newest features (what a logistic
    or linear regression would fit) is there from the first step, and the body learns what it leaves. On noisy
    targets the body alone, fitted by a few thousand steps, reaches that rule only with noise of its own
    (docs/performance.md has the measurements behind the default)."""

    def __init__(self, dims: ModelDims, output_size: int, d_model: int, num_heads: int, num_transformer_blocks: int,
                 ff_dim: int, dropout_rate: float, variable_hidden_size: int, lstm_layers: int = 1,
                 linear_skip: bool = False):
        super().__init__()
        self.dims = dims
        self.lstm_layers = lstm_layers
        self.symbol_embedding = nn.Embedding(dims.num_symbols, d_model)
        # static contexts: variable selection, enrichment, LSTM initial hidden and cell state
        self.static_contexts = nn.ModuleList(
            GatedResidualNetwork(d_model, d_model, d_model, dropout_rate) for _ in range(4))
        self.past_selection = VariableSelection(
            dims.num_observed + dims.num_known, variable_hidden_size, d_model, dropout_rate, d_model)
        self.future_selection = VariableSelection(dims.num_known, variable_hidden_size, d_model, dropout_rate, d_model)
        self.lstm = nn.LSTM(d_model, d_model, num_layers=lstm_layers, batch_first=True,
                            dropout=dropout_rate if lstm_layers > 1 else 0.0)
        self.lstm_gate = GatedLinearUnit(d_model, d_model, dropout_rate)
        self.lstm_norm = nn.LayerNorm(d_model)
        self.enrichment = GatedResidualNetwork(d_model, d_model, d_model, dropout_rate, context_dim=d_model)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(d_model, num_heads, ff_dim, dropout_rate) for _ in range(num_transformer_blocks))
        self.head = OutputHead(d_model, output_size)
        self.skip = OutputHead(dims.num_observed, output_size) if linear_skip else None   # (B, F_obs) -> (B, O)
        self.activation_checkpointing = "none"   # set through set_activation_checkpointing()

    def _run(self, level: str, fn, *args):
        """Call fn, or checkpoint it (keep only its inputs, recompute in backward) when the policy covers `level`."""
        policy = self.activation_checkpointing
        if self.training and torch.is_grad_enabled() and (policy == "all" or policy == level):
            # use_reentrant=False restores the RNG state for the recomputation: same dropout masks
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _encode(self, selected: torch.Tensor, ctx_h: torch.Tensor, ctx_c: torch.Tensor,
                ctx_enrich: torch.Tensor) -> torch.Tensor:
        """LSTM with gated skip connection, then static enrichment: (B, L, D) -> (B, L, D)."""
        state = (ctx_h.unsqueeze(0).expand(self.lstm_layers, -1, -1).contiguous(),
                 ctx_c.unsqueeze(0).expand(self.lstm_layers, -1, -1).contiguous())
        encoded, _ = self.lstm(selected, state)
        x = self.lstm_norm(selected + self.lstm_gate(encoded))
        return self.enrichment(x, ctx_enrich)

    def forward(self, observed: torch.Tensor, known: torch.Tensor, symbol: torch.Tensor,
                return_weights: bool = False) -> TFTOutput:
        past_len = observed.shape[1]
        static = self.symbol_embedding(symbol)                                        # (B, D)
        ctx_select, ctx_enrich, ctx_h, ctx_c = (grn(static) for grn in self.static_contexts)

        past_inputs = torch.cat([observed, known[:, :past_len]], dim=-1)              # (B, T, F_obs+F_known)
        past, past_weights = self._run("all", self.past_selection, past_inputs, ctx_select)      # (B, T, D)
        future, future_weights = self._run("all", self.future_selection, known[:, past_len:], ctx_select)  # (B, H, D)
        selected = torch.cat([past, future], dim=1)                                   # (B, L, D)
        x = self._run("all", self._encode, selected, ctx_h, ctx_c, ctx_enrich)        # (B, L, D)

        attention = []
        last = len(self.blocks) - 1
        for index, block in enumerate(self.blocks):
            # the head reads the last position only: the last block computes that row alone
            if return_weights:
                x, weights = block(x, need_weights=True, last_only=index == last)
                attention.append(weights)
            else:
                x = self._run("blocks", partial(block, last_only=index == last), x)[0]
        output = self.head(x[:, -1])                                                  # (B, O)
        if self.skip is not None:
            output = output + self.skip(observed[:, -1])
        if not return_weights:
            return TFTOutput(output)
        return TFTOutput(output, past_weights, future_weights, attention)


CHECKPOINTING = ("none", "blocks", "all")


def set_activation_checkpointing(model: EnhancedTFT, policy: str) -> EnhancedTFT:
    """Memory policy on a built model: the maths and the weights' names stay the same."""
    if policy not in CHECKPOINTING:
        raise ValueError(f"activation_checkpointing={policy!r}; allowed: {', '.join(CHECKPOINTING)}")
    model.activation_checkpointing = policy
    return model
