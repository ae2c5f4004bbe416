"""Time-VLM: instance normalisation (scaled by norm_const), RAL, frozen multimodal features, gated fusion,
linear predictor per variable, de-normalisation."""
from __future__ import annotations

import torch
from torch import nn

from timevlm.config import ModelConfig
from timevlm.model.fusion import GatedFusion
from timevlm.model.multimodal import Features, MultimodalEncoder
from timevlm.model.ral import RAL
from timevlm.model.vlm.base import feature_dims


class TimeVLM(nn.Module):
    """forward(x [B, seq_len, N], features) -> [B, pred_len, N].

    `features` are the frozen VLM's outputs for x (from the cache). Without them the attached
    MultimodalEncoder computes them on the fly (the end-to-end path); the two paths are interchangeable.
    The encoder is deliberately not a submodule: its weights are frozen and never checkpointed.
    """

    needs_features = True

    def __init__(self, cfg: ModelConfig, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.ral = RAL(cfg) if cfg.use_ral else None
        self.fusion = GatedFusion(cfg, vision_dim, text_dim)
        self.head = nn.Sequential(nn.LayerNorm(cfg.d_fusion), nn.Dropout(cfg.dropout),
                                  nn.Linear(cfg.d_fusion, cfg.pred_len))
        self._encoder: MultimodalEncoder | None = None

    def attach_encoder(self, encoder: MultimodalEncoder | None) -> "TimeVLM":
        object.__setattr__(self, "_encoder", encoder)
        return self

    @property
    def uses_features(self) -> bool:
        return self.fusion.uses_multimodal

    def forward(self, x: torch.Tensor, features: Features | None = None) -> torch.Tensor:
        b = x.shape[0]
        mean = x.mean(1, keepdim=True).detach()
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5).detach() / self.cfg.norm_const
        xn = (x - mean) / std
        if self.uses_features and features is None:
            if self._encoder is None:
                raise RuntimeError("TimeVLM needs VLM features: pass `features` or attach_encoder() first")
            features = self._encoder(x)
        vision = features["vision"].to(x.device, x.dtype) if features and self.cfg.use_val else None
        text = features["text"].to(x.device, x.dtype) if features and self.cfg.use_tal else None
        temporal = self.ral(xn) if self.ral is not None else None
        fused = self.fusion(temporal, vision, text, b)
        y = self.head(fused).permute(0, 2, 1)  # [B, pred_len, N]
        return y * std + mean


def build_model(cfg: ModelConfig) -> nn.Module:
    """The forecasting model named by cfg.model (Time-VLM or a baseline), without any VLM weights loaded."""
    if cfg.model == "timevlm":
        return TimeVLM(cfg, *feature_dims(cfg))
    from timevlm.model.baselines import build_baseline

    return build_baseline(cfg)
