"""Forecast metrics: MSE/MAE/MAPE on the scaled data (long-term protocol); SMAPE/MASE/OWA for M4."""
from __future__ import annotations

import numpy as np


def mse(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean((pred - true) ** 2))


def mae(pred: np.ndarray, true: np.ndarray) -> float:
    return float(np.mean(np.abs(pred - true)))


def mape(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean absolute percentage error in percent; points where the truth is 0 are left out."""
    mask = true != 0
    return float(100.0 * np.mean(np.abs((pred[mask] - true[mask]) / true[mask])))


def smape(pred: np.ndarray, true: np.ndarray) -> float:
    """M4's symmetric MAPE in percent: 200 * mean(|y - yhat| / (|y| + |yhat|)), with 0/0 counted as 0."""
    denom = np.abs(true) + np.abs(pred)
    ratio = np.divide(np.abs(pred - true), denom, out=np.zeros_like(denom, dtype=float), where=denom != 0)
    return float(200.0 * np.mean(ratio))


def mase(pred: np.ndarray, true: np.ndarray, insample: np.ndarray, m: int) -> float:
    """Mean absolute scaled error of one series, scaled by the in-sample seasonal-naive error at lag m."""
    insample = np.asarray(insample, dtype=float)
    if len(insample) <= m:
        raise ValueError(f"MASE needs more than m={m} in-sample points, got {len(insample)}")
    scale = np.mean(np.abs(insample[m:] - insample[:-m]))
    return float(np.mean(np.abs(pred - true)) / scale) if scale > 0 else float("nan")


def owa(smape_model: float, mase_model: float, smape_naive2: float, mase_naive2: float) -> float:
    """Overall weighted average (M4): mean of the model's SMAPE and MASE relative to Naive2's."""
    return 0.5 * (smape_model / smape_naive2 + mase_model / mase_naive2)


def long_term(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    return {"mse": mse(pred, true), "mae": mae(pred, true)}
