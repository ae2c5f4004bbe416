"""Vision-augmented learner: a batch of windows -> a batch of 3-channel images, as tensor ops on the device.

Channels (each stacks the periodic 2-D fold of every variable, rows = periods, columns = phase):
  0. the series itself;
  1. frequency: the series rebuilt from its `top_k_freqs` strongest Fourier components;
  2. multi-scale: the mean of moving averages over periodicity/4, /2 and /1.
Each channel is min-max scaled to [0, 1] per image, so images do not depend on the series' scale
(and hence not on norm_const). Nothing here is learnable, so images carry no gradient and the frozen
VLM's output is a fixed function of the window (which is what makes the feature cache valid).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def periodic_fold(x: torch.Tensor, period: int) -> torch.Tensor:
    """[B, L, N] -> [B, N * ceil(L / period), period]: each variable folded into rows of one period."""
    b, l, n = x.shape
    rows = math.ceil(l / period)
    pad = rows * period - l
    s = x.permute(0, 2, 1)  # [B, N, L]
    if pad:
        s = F.pad(s, (pad, 0), mode="replicate")  # pad the oldest end, keep the phase of the latest step
    return s.reshape(b, n * rows, period)


def fft_lowpass(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the mean and the k strongest frequencies of each variable (per window). [B, L, N] -> same."""
    spec = torch.fft.rfft(x, dim=1)
    mag = spec.abs()
    mag[:, 0] = float("inf")  # always keep the mean
    k = min(k + 1, spec.shape[1])
    thresh = mag.topk(k, dim=1).values[:, -1:]
    return torch.fft.irfft(spec * (mag >= thresh), n=x.shape[1], dim=1)


def multi_scale(x: torch.Tensor, period: int) -> torch.Tensor:
    """Mean of centred moving averages with windows period/4, period/2 and period. [B, L, N] -> same."""
    s = x.permute(0, 2, 1)
    outs = []
    for w in sorted({max(1, period // 4), max(1, period // 2), max(1, period)}):
        left, right = (w - 1) // 2, w // 2
        padded = F.pad(s, (left, right), mode="replicate") if w > 1 else s
        outs.append(F.avg_pool1d(padded, kernel_size=w, stride=1))
    return torch.stack(outs).mean(0).permute(0, 2, 1)


def _minmax(img: torch.Tensor) -> torch.Tensor:
    flat = img.flatten(2)
    lo, hi = flat.min(-1).values[..., None, None], flat.max(-1).values[..., None, None]
    return (img - lo) / (hi - lo).clamp_min(1e-6)


def series_to_image(x: torch.Tensor, period: int, image_size: int, top_k_freqs: int = 5) -> torch.Tensor:
    """[B, L, N] float -> [B, 3, image_size, image_size] in [0, 1]."""
    x = x.float()
    period = max(1, min(period, x.shape[1]))
    chans = [x, fft_lowpass(x, top_k_freqs), multi_scale(x, period)]
    grids = torch.stack([periodic_fold(c, period) for c in chans], dim=1)  # [B, 3, rows, period]
    img = F.interpolate(grids, size=(image_size, image_size), mode="bilinear", align_corners=False,
                        antialias=grids.shape[-1] > image_size or grids.shape[-2] > image_size)
    return _minmax(img)
