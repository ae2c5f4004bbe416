"""Baselines in the same harness: DLinear (Zeng et al., AAAI 2023) and PatchTST (Nie et al., ICLR 2023).

Both follow their published architectures (channel-independent; DLinear's moving-average decomposition with
kernel 25 and two linear maps; PatchTST's RevIN, patching, Transformer encoder and flatten head). They take
the same [B, seq_len, N] windows and ignore VLM features, so a study can put them beside Time-VLM on the
same splits, seeds and budget (`model.model: dlinear | patchtst`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from timevlm.config import ModelConfig
from timevlm.model.normalization import window_stats


class DecompositionLinear(nn.Module):
    """DLinear's map of series [..., seq_len] -> [..., pred_len]: a moving average (kernel 25, replicate-padded)
    splits each series into trend and remainder, and one linear map each forecasts from them; both start as the
    series' mean (the published initialisation). Time-VLM's temporal branch uses it as its linear path."""

    def __init__(self, seq_len: int, pred_len: int, kernel: int = 25) -> None:
        super().__init__()
        self.kernel = kernel
        self.seasonal = nn.Linear(seq_len, pred_len)
        self.trend = nn.Linear(seq_len, pred_len)
        for lin in (self.seasonal, self.trend):
            nn.init.constant_(lin.weight, 1.0 / seq_len)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        front, end = (self.kernel - 1) // 2, self.kernel // 2
        shape = s.shape
        flat = s.reshape(-1, 1, shape[-1])
        trend = F.avg_pool1d(F.pad(flat, (front, end), mode="replicate"), self.kernel, stride=1).reshape(shape)
        return self.seasonal(s - trend) + self.trend(trend)


class DLinear(DecompositionLinear):
    uses_features = False

    def __init__(self, cfg: ModelConfig, kernel: int = 25) -> None:
        super().__init__(cfg.seq_len, cfg.pred_len, kernel)
        self.instance_norm = cfg.instance_norm

    def forward(self, x: torch.Tensor, features=None) -> torch.Tensor:
        mean, std = window_stats(x, self.instance_norm)
        y = super().forward(((x - mean) / std).permute(0, 2, 1))  # per variable: [B, N, L] -> [B, N, H]
        return y.permute(0, 2, 1) * std + mean


class PatchTST(nn.Module):
    uses_features = False

    def __init__(self, cfg: ModelConfig, n_layers: int = 3, d_ff: int | None = None) -> None:
        super().__init__()
        self.patch_len, self.stride = cfg.patch_len, cfg.stride
        n_patches = (cfg.seq_len - cfg.patch_len) // cfg.stride + 2  # +1 for the end padding by `stride`
        d = cfg.d_model
        self.embed = nn.Linear(cfg.patch_len, d)
        self.pos = nn.Parameter(torch.empty(n_patches, d).uniform_(-0.02, 0.02))
        layer = nn.TransformerEncoderLayer(d, cfg.n_heads, d_ff or 2 * d, cfg.dropout, batch_first=True,
                                           norm_first=False, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(d * n_patches, cfg.pred_len)
        self.instance_norm = cfg.instance_norm

    def forward(self, x: torch.Tensor, features=None) -> torch.Tensor:
        b, l, n = x.shape
        mean, std = window_stats(x, self.instance_norm)
        s = ((x - mean) / std).permute(0, 2, 1)  # RevIN, [B, N, L]
        s = F.pad(s, (0, self.stride), mode="replicate")
        patches = s.unfold(-1, self.patch_len, self.stride).reshape(b * n, -1, self.patch_len)
        z = self.encoder(self.drop(self.embed(patches) + self.pos))
        out = self.head(self.drop(z.flatten(1))).reshape(b, n, -1).permute(0, 2, 1)
        return out * std + mean


def build_baseline(cfg: ModelConfig) -> nn.Module:
    return {"dlinear": DLinear, "patchtst": PatchTST}[cfg.model](cfg)
