"""The elementwise passes around the step's matrix products, one sweep over memory each (elementwise.cpp), on
the CPU in fp32; each function falls back to the PyTorch expression it stands for elsewhere (other devices,
dtypes, or no compiler). The products stay PyTorch's, so FlopCounterMode counts them as before. On a
seq_len-512 step the tensors are 7-22 MB and each sweep over one costs ~0.3-1.5 ms on our 2 cores, most of it
waiting on memory: what these save is sweeps.

- `dropout(x, p)`: training-mode dropout, the mask hashed from a key (from torch's generator) and each
  element's index inside the sweep that applies it, forward and backward alike: nothing drawn, stored or
  multiplied separately.
- `patch_embedding(patches, linear, pos, p)` = dropout(linear(patches) + pos) (p = 0: no dropout): bias,
  position and mask in one sweep after the product; backward: mask, bias and position sums in one.
- `residual_linear(h, x, weight, bias)` = h + F.linear(x, weight, bias): bias and residual added in one sweep
  after the product (no `addmm` bias copy for the product to read back, no separate add).
- `residual_linear_norm(h, x, weight, bias, norm)` = (y, norm(y)) for that y: the LayerNorm computed from the
  rows just written; backward: the norm's gradient with the residual stream's added in one sweep.
- `linear_relu(x, linear)` = relu(linear(x)): bias and ReLU in one in-place sweep; backward: the ReLU mask
  and the bias gradient in one (on the feed-forward layer: four sweeps over 14.7 MB by two).
"""
from __future__ import annotations

import ctypes

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from timevlm.kernels import build

_P, _I, _L, _U32, _F32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_uint32, ctypes.c_float
_SIGNATURES = {  # argument types of elementwise.cpp's functions (all return void)
    "timevlm_dropout": [_P, _P, _L, _U32, _U32, _F32, _I],
    "timevlm_bias_relu": [_P, _P, _L, _I, _I],
    "timevlm_relu_backward_bias": [_P, _P, _P, _P, _L, _I, _I],
    "timevlm_embed_forward": [_P, _P, _P, _L, _I, _I, _U32, _U32, _F32, _I],
    "timevlm_embed_backward": [_P, _P, _P, _P, _L, _I, _I, _U32, _U32, _F32, _I],
    "timevlm_add_bias_residual": [_P, _P, _P, _L, _I, _I],
    "timevlm_add_bias_residual_norm": [_P, _P, _P, _P, _P, _P, _P, _P, _L, _I, _F32, _I],
    "timevlm_norm_backward": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _L, _I, _I],
}


def _library() -> ctypes.CDLL | None:
    return build.load("elementwise", _SIGNATURES)


def _cpu_fp32(*tensors: torch.Tensor) -> bool:
    """Whether the kernels can take these tensors: all on the CPU in fp32, and the library built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and _library() is not None


def _product(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as [rows, in], x W^T [rows, out]): PyTorch's product, without the bias the kernels add."""
    flat = x.reshape(-1, x.shape[-1])
    return flat, torch.mm(flat, weight.t())


def _product_grads(ctx, g: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor, x_shape: torch.Size,
                   x_index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The gradients of _product's x (shaped x_shape) and weight, from the output's g [rows, out], as far as
    autograd asks for them (x is input x_index of the Function, the weight the next one)."""
    dx = torch.mm(g, weight).view(x_shape) if ctx.needs_input_grad[x_index] else None
    dw = torch.mm(g.t(), flat) if ctx.needs_input_grad[x_index + 1] else None
    return dx, dw


def _mask(p: float) -> tuple[int, int, float]:
    """(key, threshold, scale) of a fresh dropout mask: an element is kept when its 16-bit draw >= threshold =
    round(p * 65536), with probability 1 - p (p rounded to 1/65536). p = 0: (0, 0, 1.0), everything kept."""
    if p == 0.0:
        return 0, 0, 1.0
    return int(torch.randint(2 ** 32, (), dtype=torch.int64)), int(round(p * 65536)), 1.0 / (1.0 - p)


def _apply_mask(x: torch.Tensor, key: int, threshold: int, scale: float) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty_like(x)
    _library().timevlm_dropout(x.data_ptr(), y.data_ptr(), x.numel(), key, threshold, scale, torch.get_num_threads())
    return y


class _Dropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        ctx.mask = _mask(p)
        return _apply_mask(x, *ctx.mask)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _apply_mask(grad, *ctx.mask), None


def dropout_usable(x: torch.Tensor) -> bool:
    return x.numel() < 2 ** 32 and _cpu_fp32(x)


_SEED = 2 ** 63 - 1


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout of x with probability p (0: x itself). Keeps an element with probability 1 - p
    (p rounded to 1/65536 on CPU) and scales kept ones by 1/(1 - p), as `nn.Dropout` does; `torch.manual_seed`
    decides every mask. CPU fp32 with the kernels built: no mask is drawn, a hash of a key from torch's generator
    and each element's index decides it inside the sweep that applies it, forward and backward alike. Other CPU
    tensors: a mask from NumPy's SFC64 generator (64-bit words cut into four 16-bit draws), seeded per call from
    torch's generator. Off the CPU: `F.dropout`. Why and by how much: reports/speed."""
    if p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p, True)
    if dropout_usable(x):
        return _Dropout.apply(x, p)
    n = x.numel()
    seed = int(torch.randint(_SEED, ()))
    draws = np.random.SFC64(seed).random_raw((n + 3) // 4).view(np.int16)[:n]
    keep = draws >= int(-32768 + round(p * 65536))
    mask = torch.from_numpy(np.multiply(keep, np.float32(1.0 / (1.0 - p)), dtype=np.float32)).view(x.shape)
    return x * mask.to(x.dtype)  # no copy for float32


class _LinearReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        flat, y = _product(x, weight)
        _library().timevlm_bias_relu(y.data_ptr(), bias.contiguous().data_ptr(), y.shape[0], y.shape[1],
                                     torch.get_num_threads())
        ctx.save_for_backward(flat, weight, y)
        ctx.in_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight, y = ctx.saved_tensors
        g = grad.reshape(y.shape).contiguous()
        gy, db = torch.empty_like(y), torch.empty(y.shape[1], dtype=y.dtype)
        _library().timevlm_relu_backward_bias(g.data_ptr(), y.data_ptr(), gy.data_ptr(), db.data_ptr(),
                                              y.shape[0], y.shape[1], torch.get_num_threads())
        return *_product_grads(ctx, gy, flat, weight, ctx.in_shape, 0), db if ctx.needs_input_grad[2] else None


class _PatchEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, pos: torch.Tensor,
                p: float) -> torch.Tensor:
        flat, y = _product(patches, weight)
        ctx.mask = _mask(p)
        _library().timevlm_embed_forward(y.data_ptr(), bias.contiguous().data_ptr(), pos.contiguous().data_ptr(),
                                         y.shape[0], y.shape[1], pos.shape[0], *ctx.mask, torch.get_num_threads())
        ctx.save_for_backward(flat, weight)
        ctx.patch_shape = patches.shape
        return y.view(*patches.shape[:-1], y.shape[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight = ctx.saved_tensors
        g = grad.reshape(flat.shape[0], -1).contiguous()
        period = ctx.patch_shape[-2]
        gd, dpos, db = torch.empty_like(g), g.new_empty(period, g.shape[1]), g.new_empty(g.shape[1])
        _library().timevlm_embed_backward(g.data_ptr(), gd.data_ptr(), dpos.data_ptr(), db.data_ptr(), g.shape[0],
                                          g.shape[1], period, *ctx.mask, torch.get_num_threads())
        return *_product_grads(ctx, gd, flat, weight, ctx.patch_shape, 0), db, dpos, None


def patch_embedding_usable(patches: torch.Tensor, linear: nn.Linear, pos: torch.Tensor, p: float) -> bool:
    return (linear.bias is not None and 0.0 <= p < 1.0 and patches.numel() // patches.shape[-1] * pos.shape[1] < 2 ** 32
            and _cpu_fp32(patches, linear.weight, pos))


def patch_embedding(patches: torch.Tensor, linear: nn.Linear, pos: torch.Tensor, p: float) -> torch.Tensor:
    """patches [..., P, patch_len] -> dropout(linear(patches) + pos) [..., P, d], pos [P, d], dropout p (0: off);
    on CPU in fp32 bias, position and dropout are one sweep."""
    if patch_embedding_usable(patches, linear, pos, p):
        return _PatchEmbedding.apply(patches, linear.weight, linear.bias, pos, p)
    return dropout(linear(patches) + pos, p)


class _ResidualLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        flat, y = _product(x, weight)
        res = h.reshape(y.shape).contiguous()
        _library().timevlm_add_bias_residual(y.data_ptr(), res.data_ptr(), bias.contiguous().data_ptr(), y.shape[0],
                                             y.shape[1], torch.get_num_threads())
        ctx.save_for_backward(flat, weight)
        ctx.x_shape = x.shape
        return y.view(h.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        flat, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        return grad, *_product_grads(ctx, g, flat, weight, ctx.x_shape, 1), g.sum(0) if ctx.needs_input_grad[3] else None


def _residual_usable(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> bool:
    return h.shape[:-1] == x.shape[:-1] and h.shape[-1] == weight.shape[0] and _cpu_fp32(h, x, weight, bias)


def residual_linear(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h + F.linear(x, weight, bias), h of the output's shape."""
    if _residual_usable(h, x, weight, bias):
        return _ResidualLinear.apply(h, x, weight, bias)
    return h + F.linear(x, weight, bias)


class _ResidualLinearNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, x, weight, bias, norm_weight, norm_bias, eps: float):
        flat, y = _product(x, weight)
        res = h.reshape(y.shape).contiguous()
        z = torch.empty_like(y)
        mean, rstd = y.new_empty(y.shape[0], 1), y.new_empty(y.shape[0], 1)
        _library().timevlm_add_bias_residual_norm(
            y.data_ptr(), res.data_ptr(), bias.contiguous().data_ptr(), norm_weight.contiguous().data_ptr(),
            norm_bias.contiguous().data_ptr(), z.data_ptr(), mean.data_ptr(), rstd.data_ptr(), y.shape[0],
            y.shape[1], eps, torch.get_num_threads())
        ctx.save_for_backward(flat, weight, y, mean, rstd, norm_weight, norm_bias)
        ctx.x_shape = x.shape
        return y.view(h.shape), z.view(h.shape)

    @staticmethod
    def backward(ctx, grad_y, grad_z):
        flat, weight, y, mean, rstd, norm_weight, norm_bias = ctx.saved_tensors
        gy = grad_y.reshape(y.shape).contiguous() if grad_y is not None else None
        dnw = dnb = None
        if grad_z is not None:  # the norm's backward with the residual stream's gradient added in one sweep
            gz = grad_z.reshape(y.shape).contiguous()
            g, dnw, dnb = torch.empty_like(y), torch.empty_like(norm_weight), torch.empty_like(norm_weight)
            _library().timevlm_norm_backward(gz.data_ptr(), gy.data_ptr() if gy is not None else None, y.data_ptr(),
                                             mean.data_ptr(), rstd.data_ptr(), norm_weight.contiguous().data_ptr(),
                                             g.data_ptr(), dnw.data_ptr(), dnb.data_ptr(), y.shape[0], y.shape[1],
                                             torch.get_num_threads())
        else:
            g = gy if gy is not None else torch.zeros_like(y)
        dx, dw = _product_grads(ctx, g, flat, weight, ctx.x_shape, 1)
        db = g.sum(0) if ctx.needs_input_grad[3] else None
        return g.view(ctx.x_shape[:-1] + (y.shape[1],)), dx, dw, db, dnw, dnb, None


def residual_linear_norm(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, norm(y)) for y = h + F.linear(x, weight, bias); `norm` a LayerNorm over the last dimension (or any
    module, then applied as it is)."""
    if (isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None
            and tuple(norm.normalized_shape) == (h.shape[-1],) and _residual_usable(h, x, weight, bias)
            and _cpu_fp32(norm.weight, norm.bias)):
        return _ResidualLinearNorm.apply(h, x, weight, bias, norm.weight, norm.bias, norm.eps)
    y = residual_linear(h, x, weight, bias)
    return y, norm(y)


def linear_relu_usable(x: torch.Tensor, linear: nn.Linear) -> bool:
    return linear.bias is not None and _cpu_fp32(x, linear.weight, linear.bias)


def linear_relu(x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    if linear_relu_usable(x, linear):
        return _LinearReLU.apply(x, linear.weight, linear.bias)
    return F.relu(linear(x))
