"""Per-window instance normalisation (RevIN without its affine weights), or none: the statistics a model takes
out of its input window and puts back into its forecast.

`model.instance_norm` picks it; `auto`, each model keeps its published choice (timevlm.config.MODEL_DEFAULTS:
Time-VLM and PatchTST normalise each window, DLinear maps the raw window).
"""
from __future__ import annotations

import torch

from timevlm.config import INSTANCE_NORMS


def window_stats(x: torch.Tensor, mode: str, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, L, N] -> (mean, std), each [B, 1, N], no gradient: the model sees (x - mean) / std and its forecast
    is y * std + mean. "revin": the window's mean and standard deviation / `scale` (Time-VLM's norm_const);
    "none": 0 and 1 / `scale` (the raw window, scaled as the normalised one would be)."""
    if mode == "revin":
        mean = x.mean(1, keepdim=True).detach()
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5).detach() / scale
        return mean, std
    if mode == "none":
        stats = x.new_zeros(x.shape[0], 1, x.shape[2])
        return stats, stats + 1.0 / scale
    raise ValueError(f"instance_norm must be one of {INSTANCE_NORMS}, got {mode!r}")
