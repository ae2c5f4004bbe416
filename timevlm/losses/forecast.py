"""The forecast's loss: MSE, or MSE + MAE (the authors' masked-visual-modelling objective: the masked part of
the sequence is the future, the model forecasts it, both errors count)."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

ForecastLoss = Literal["mse", "mse+mae"]
FORECAST_LOSSES = ("mse", "mse+mae")


def forecast_loss(pred: torch.Tensor, target: torch.Tensor, kind: ForecastLoss = "mse") -> torch.Tensor:
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "mse+mae":
        return F.mse_loss(pred, target) + F.l1_loss(pred, target)
    raise ValueError(f"forecast loss must be one of {FORECAST_LOSSES}, got {kind!r}")
