"""Dropout and multi-head attention in the forms the training step runs fastest on CPU.

`Dropout`: keeps an element with probability 1 - p (p rounded to 1/65536) and scales kept ones by 1/(1 - p),
as `nn.Dropout` does; `torch.manual_seed` decides every mask. On CPU the mask comes from NumPy's SFC64
generator (64-bit words cut into four 16-bit draws), seeded per call from torch's CPU generator; where the CPU
kernels build (timevlm/kernels, fp32) no mask is drawn: a hash of a key from torch's generator and each
element's index decides it inside the sweep that applies it, forward and backward alike. Off the CPU it is
`F.dropout`. Why and by how much: reports/speed.

`multihead_attention`: the projections of an `nn.MultiheadAttention` (so state_dicts keep their names) around
`F.scaled_dot_product_attention` without attention dropout (PyTorch's fused kernel); self-attention on the CPU
in fp32 goes to `timevlm::self_attention` (timevlm/kernels), which reads the packed projection as it is.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from timevlm.kernels import attention as attention_kernel
from timevlm.kernels import elementwise

_SEED = 2 ** 63 - 1


class Dropout(nn.Dropout):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or self.p >= 1.0:
            return F.dropout(x, self.p, True)
        if elementwise.dropout_usable(x):  # the mask hashed in the sweep that applies it (timevlm/kernels)
            return elementwise.dropout(x, self.p)
        n = x.numel()
        seed = int(torch.randint(_SEED, ()))
        draws = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
        keep = draws >= int(-32768 + round(self.p * 65536))
        mask = torch.from_numpy(np.multiply(keep, np.float32(1.0 / (1.0 - self.p)), dtype=np.float32)).view(x.shape)
        return x * mask.to(x.dtype)  # no copy for float32


def multihead_attention(attn: nn.MultiheadAttention, query: torch.Tensor, key_value: torch.Tensor,
                        residual: torch.Tensor | None = None, norm: nn.Module | None = None):
    """[B, Lq, d] attending over [B, Lk, d] with `attn`'s weights (batch_first, no mask) -> [B, Lq, d], plus
    `residual` [B, Lq, d] if given (added with the output projection's bias, in one sweep on CPU); with `norm`
    too, (that sum, norm(sum)) from the same sweep."""
    w, b, d, h = attn.in_proj_weight, attn.in_proj_bias, query.shape[-1], attn.num_heads
    out_proj = attn.out_proj
    if query is key_value and attention_kernel.usable(query, h):
        # CPU fp32: the kernel adds the projection's bias and reads the packed projection as it is
        out = torch.ops.timevlm.self_attention(torch.matmul(query, w.t()), b, h)[0]
        return _project(out, out_proj, residual, norm)
    if query is key_value:
        q, k, v = F.linear(query, w, b).chunk(3, dim=-1)
    else:
        q = F.linear(query, w[:d], b[:d])
        k, v = F.linear(key_value, w[d:], b[d:]).chunk(2, dim=-1)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (h, d // h)).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)
    return _project(out, out_proj, residual, norm)


def _project(out: torch.Tensor, out_proj: nn.Linear, residual: torch.Tensor | None, norm: nn.Module | None):
    if residual is None:
        return out_proj(out)
    if norm is None:
        return elementwise.residual_linear(residual, out, out_proj.weight, out_proj.bias)
    return elementwise.residual_linear_norm(residual, out, out_proj.weight, out_proj.bias, norm)
