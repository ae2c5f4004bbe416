"""`timevlm::self_attention`: multi-head self-attention straight from a packed [B, L, 3*H*D] projection (before
its bias, which the kernel adds), on the CPU in fp32, by the kernel in attention.cpp; a PyTorch custom operator
with its own backward, so autograd, `torch.compile` (an opaque call) and `FlopCounterMode` (same count as the
fused SDPA kernel) all see it.

On the step it was written for (ETTh1, seq_len 512: 224 sequences of 64 patches, 4 heads of 32) it replaces
PyTorch's fused CPU attention, the split of the projection into heads, the projection's bias copy and, in the
backward, the zero-filled gradients, their concatenation and the bias-gradient sum: 3.9 + 6.7 against 19.5 ms
forward and backward alone on two threads (reports/speed/README.md shows what that does to the whole step).
Values and gradients agree with `F.scaled_dot_product_attention` to fp32 rounding (tests/test_kernels.py).
"""
from __future__ import annotations

import ctypes

import torch
from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

from timevlm.kernels import build

_P, _I = ctypes.c_void_p, ctypes.c_int
_SIGNATURES = {"timevlm_attention_forward": [_P, _P, _P, _P, _I, _I, _I, _I, _I],
               "timevlm_attention_backward": [_P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I]}


def _library() -> ctypes.CDLL | None:
    return build.load("attention", _SIGNATURES)


def usable(x: torch.Tensor, heads: int) -> bool:
    """Whether the kernel can take self-attention over x [B, L, H*D] (CPU, fp32) on this machine."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 3 and x.shape[-1] % heads == 0
            and _library() is not None)


def scaled_dot_product(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of q [B, Lq, H*D] over k, v [B, Lk, H*D] in `heads` heads -> [B, Lq, H*D] (PyTorch's fused
    scaled_dot_product_attention, no mask, no dropout)."""
    def split(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (heads, t.shape[-1] // heads)).transpose(1, 2)

    return torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).flatten(2)


def packed_self_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """Self-attention of x [B, L, d] through the packed q/k/v projection (weight [3d, d], bias [3d]) -> [B, L, d],
    before the output projection. CPU fp32: `timevlm::self_attention`, which adds the projection's bias and reads
    the packed projection as it is; elsewhere PyTorch's operators."""
    if usable(x, heads):
        return torch.ops.timevlm.self_attention(torch.matmul(x, weight.t()), bias, heads)[0]
    q, k, v = torch.nn.functional.linear(x, weight, bias).chunk(3, dim=-1)
    return scaled_dot_product(q, k, v, heads)


def _dims(qkv_shape, heads: int) -> tuple[int, int, int, int]:
    """[B, L, 3*H*D] -> (B, L, H*D, D)."""
    b, length, width = qkv_shape
    return b, length, width // 3, width // 3 // heads


@torch.library.custom_op("timevlm::self_attention", mutates_args=())
def self_attention(qkv: torch.Tensor, bias: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, L, 3*H*D] (queries, keys, values side by side, heads within each; without the bias) and
    bias [3*H*D] -> (out [B, L, H*D], log-sum-exp of each query's scores [B, H, L], kept for the backward)."""
    qkv, bias = qkv.contiguous(), bias.contiguous()
    b, length, d, head_dim = _dims(qkv.shape, heads)
    out, lse = qkv.new_empty(b, length, d), qkv.new_empty(b, heads, length)
    _library().timevlm_attention_forward(qkv.data_ptr(), bias.data_ptr(), out.data_ptr(), lse.data_ptr(), b,
                                         length, heads, head_dim, torch.get_num_threads())
    return out, lse


@self_attention.register_fake
def _(qkv: torch.Tensor, bias: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    b, length, d, _ = _dims(qkv.shape, heads)
    return qkv.new_empty(b, length, d), qkv.new_empty(b, heads, length)


@torch.library.custom_op("timevlm::self_attention_backward", mutates_args=())
def self_attention_backward(grad: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor,
                            lse: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient of self_attention's `out` -> the gradients of its qkv [B, L, 3*H*D] and bias [3*H*D]."""
    grad, qkv, bias = grad.contiguous(), qkv.contiguous(), bias.contiguous()
    b, length, _, head_dim = _dims(qkv.shape, heads)
    dqkv, dbias = torch.empty_like(qkv), torch.empty_like(bias)
    _library().timevlm_attention_backward(grad.data_ptr(), qkv.data_ptr(), bias.data_ptr(), out.data_ptr(),
                                          lse.data_ptr(), dqkv.data_ptr(), dbias.data_ptr(), b, length, heads,
                                          head_dim, torch.get_num_threads())
    return dqkv, dbias


@self_attention_backward.register_fake
def _(grad: torch.Tensor, qkv: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
      heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(qkv), torch.empty_like(bias)


def _setup_context(ctx, inputs, output) -> None:
    qkv, bias, heads = inputs
    out, lse = output
    ctx.save_for_backward(qkv, bias, out, lse)
    ctx.heads = heads
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, _grad_lse) -> tuple[torch.Tensor, torch.Tensor, None]:
    qkv, bias, out, lse = ctx.saved_tensors
    dqkv, dbias = self_attention_backward(grad_out, qkv, bias, out, lse, ctx.heads)
    return dqkv, dbias, None


self_attention.register_autograd(_backward, setup_context=_setup_context)


def _head_shape(qkv_shape, heads: int) -> tuple[int, int, int, int]:
    b, length, _, head_dim = _dims(qkv_shape, heads)
    return b, heads, length, head_dim


@register_flop_formula(torch.ops.timevlm.self_attention)
def _forward_flops(qkv_shape, bias_shape, heads: int, *args, **kwargs) -> int:
    q = _head_shape(qkv_shape, heads)
    return sdpa_flop_count(q, q, q)


@register_flop_formula(torch.ops.timevlm.self_attention_backward)
def _backward_flops(grad_shape, qkv_shape, bias_shape, output_shape, lse_shape, heads: int, *args, **kwargs) -> int:
    q = _head_shape(qkv_shape, heads)
    return sdpa_backward_flop_count(q, q, q, q)
