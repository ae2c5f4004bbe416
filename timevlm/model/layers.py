"""The network's dropout and multi-head attention, as plain functions of their inputs; which device code runs
them (timevlm/kernels on CPU, PyTorch's operators elsewhere) is decided inside the operations they call.

`Dropout`: `nn.Dropout`'s module (same state, same train/eval behaviour) applying `kernels.elementwise.dropout`.

`multihead_attention`: the projections of an `nn.MultiheadAttention` (so state_dicts keep their names) around
scaled dot-product attention without attention dropout.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from timevlm.kernels import attention as attention_kernel
from timevlm.kernels import elementwise


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elementwise.dropout(x, self.p) if self.training else x


def multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor,
                        residual: torch.Tensor | None = None, norm: nn.Module | None = None):
    """[B, Lq, d] attending over [B, Lk, d] with `attn`'s weights (batch_first, no mask) -> [B, Lq, d], plus
    `residual` [B, Lq, d] if given (added with the output projection's bias, in one sweep on CPU); with `norm`
    too, (that sum, norm(sum)) from the same sweep."""
    w, b, d, h = attn.in_proj_weight, attn.in_proj_bias, query.shape[-1], attn.num_heads
    if query is key_value:
        out = attention_kernel.packed_self_attention(query, w, b, h)
    else:
        q = F.linear(query, w[:d], b[:d])
        k, v = F.linear(key_value, w[d:], b[d:]).chunk(2, dim=-1)
        out = attention_kernel.scaled_dot_product(q, k, v, h)
    return _project(out, attn.out_proj, residual, norm)


def _project(out: torch.Tensor, out_proj: nn.Linear, residual: torch.Tensor | None, norm: nn.Module | None):
    if residual is None:
        return out_proj(out)
    if norm is None:
        return elementwise.residual_linear(residual, out, out_proj.weight, out_proj.bias)
    return elementwise.residual_linear_norm(residual, out, out_proj.weight, out_proj.bias, norm)
