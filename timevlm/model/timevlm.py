"""Time-VLM: instance normalisation (scaled by norm_const), a temporal forecast from the RAL, a gated
multimodal residual from the frozen VLM's features (VAL images, TAL prompts), de-normalisation."""
from __future__ import annotations

import torch
from torch import nn

from timevlm.config import ModelConfig
from timevlm.model.fusion import MultimodalResidual
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
        self.multimodal = MultimodalResidual(cfg, vision_dim, text_dim) if cfg.use_val or cfg.use_tal else None
        self._encoder: MultimodalEncoder | None = None

    def attach_encoder(self, encoder: MultimodalEncoder | None) -> "TimeVLM":
        object.__setattr__(self, "_encoder", encoder)
        return self

    @property
    def uses_features(self) -> bool:
        return self.multimodal is not None

    @property
    def residual_choices(self) -> tuple[float, ...]:
        """Scales of the multimodal residual that validation chooses between (see training.fit)."""
        return (1.0, 0.0) if self.multimodal is not None and self.ral is not None else ()

    def set_residual_scale(self, scale: float) -> None:
        self.multimodal.scale.fill_(scale)

    @property
    def residual_scale(self) -> float | None:
        return float(self.multimodal.scale) if self.residual_choices else None

    def forward(self, x: torch.Tensor, features: Features | None = None) -> torch.Tensor:
        mean = x.mean(1, keepdim=True).detach()
        std = torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5).detach() / self.cfg.norm_const
        xn = (x - mean) / std
        if self.uses_features and features is None:
            if self._encoder is None:
                raise RuntimeError("TimeVLM needs VLM features: pass `features` or attach_encoder() first")
            features = self._encoder(x)
        vision = features["vision"].to(x.device, x.dtype) if features and self.cfg.use_val else None
        text = features["text"].to(x.device, x.dtype) if features and self.cfg.use_tal else None
        temporal, summary = self.ral(xn) if self.ral is not None else (None, None)
        y = temporal if self.multimodal is None else self.multimodal(temporal, summary, vision, text)
        return y.permute(0, 2, 1) * std + mean  # [B, pred_len, N]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The forecasting model named by cfg.model (Time-VLM or a baseline), without any VLM weights loaded."""
    if cfg.model == "timevlm":
        return TimeVLM(cfg, *feature_dims(cfg))
    from timevlm.model.baselines import build_baseline

    return build_baseline(cfg)
