"""Figures people would rather look at than read: forecast vs truth, VAL images, sensitivity curves."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def forecast_plot(inputs: np.ndarray, pred: np.ndarray, true: np.ndarray, path: str | Path,
                  var: int = -1, title: str = "") -> Path:
    """inputs [k, seq_len, N], pred/true [k, pred_len, N]: one panel per window, variable `var`."""
    k = len(pred)
    fig, axes = plt.subplots(k, 1, figsize=(9, 2.4 * k), squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        L, H = inputs.shape[1], pred.shape[1]
        ax.plot(np.arange(L), inputs[i, :, var], color="0.4", lw=1, label="input")
        ax.plot(np.arange(L, L + H), true[i, :, var], color="k", lw=1.2, label="truth")
        ax.plot(np.arange(L, L + H), pred[i, :, var], color="tab:red", lw=1.2, label="forecast")
        ax.axvline(L, color="0.7", ls="--", lw=0.8)
        if i == 0:
            ax.legend(loc="upper left", fontsize=8)
            ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def image_grid(images: np.ndarray, path: str | Path, titles: list[str] | None = None) -> Path:
    """images [k, 3, H, W] in [0, 1]: each image and its three channels (series, frequency, multi-scale)."""
    k = len(images)
    fig, axes = plt.subplots(k, 4, figsize=(8, 2.1 * k), squeeze=False)
    names = ["RGB", "series", "frequency", "multi-scale"]
    for i in range(k):
        axes[i, 0].imshow(np.transpose(images[i], (1, 2, 0)))
        for c in range(3):
            axes[i, c + 1].imshow(images[i, c], cmap="viridis")
        for j, ax in enumerate(axes[i]):
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=9)
        if titles:
            axes[i, 0].set_ylabel(titles[i], fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
