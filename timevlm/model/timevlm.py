"""Time-VLM: instance normalisation (scaled by norm_const), a temporal forecast from the RAL, a gated
multimodal residual from the frozen VLM's features (VAL images, TAL prompts), de-normalisation."""
from __future__ import annotations

import torch
from torch import nn

from timevlm.config import ModelConfig
from timevlm.model.fusion import MultimodalResidual
from timevlm.model.multimodal import Features, MultimodalEncoder
from timevlm.model.normalization import window_stats
from timevlm.model.ral import RAL
from timevlm.model.vlm.base import feature_dims


class TimeVLM(nn.Module):
    """forward(x [B, seq_len, N], features) -> [B, pred_len, N]. A `contract.Forecaster` that is also
    Switchable, Encoding and Aligned.

    `features` are the frozen VLM's outputs for x (from the cache). Without them the attached
    MultimodalEncoder computes them on the fly (the end-to-end path); the two paths are interchangeable.
    The encoder is deliberately not a submodule: its weights are frozen and never checkpointed.
    """

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
    def encoder(self) -> MultimodalEncoder | None:
        return self._encoder

    @property
    def uses_features(self) -> bool:
        return self.multimodal is not None

    @property
    def modality_dim(self) -> int | None:
        """The width of the projected vision and text tokens; None without both learners (contract.Aligned)."""
        mm = self.multimodal
        if mm is None or mm.vision_proj is None or mm.text_proj is None:
            return None
        return mm.modality.shape[-1]

    def _switch_buffers(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.ral is not None and self.ral.linear is not None:
            out["head_scale"] = self.ral.head_scale  # the patch head's residual on the linear forecast
        if self.multimodal is not None and self.ral is not None:
            out["residual_scale"] = self.multimodal.scale  # the multimodal residual on the temporal forecast
        return out

    @property
    def switches(self) -> dict[str, tuple[float, ...]]:
        """Residual branches that validation opens (1) or closes (0), with their choices, the first being the
        model as trained (training.validate); buffers, so the choice travels with the state_dict."""
        return {name: (1.0, 0.0) for name in self._switch_buffers()}

    def set_switch(self, name: str, value: float) -> None:
        self._switch_buffers()[name].fill_(value)

    @property
    def switch_values(self) -> dict[str, float]:
        return {name: float(buf) for name, buf in self._switch_buffers().items()}

    def forward(self, x: torch.Tensor, features: Features | None = None) -> torch.Tensor:
        if self.training:  # the RAL drops its head's residual per window; every switch is open in training
            mean, std, xn, vision, text = self._inputs(x, features)
            temporal, summary = self.ral(xn) if self.ral is not None else (None, None)
            y = temporal if self.multimodal is None else self.multimodal(temporal, summary, vision, text)
            return y.permute(0, 2, 1) * std + mean  # [B, pred_len, N]
        return self.combine(self.forecast_parts(x, features), self._switch_buffers())

    def _inputs(self, x: torch.Tensor, features: Features | None):
        mean, std = window_stats(x, self.cfg.instance_norm, self.cfg.norm_const)
        if self.uses_features and features is None:
            features = self.encode(x)
        vision = features["vision"].to(x.device, x.dtype) if features and self.cfg.use_val else None
        text = features["text"].to(x.device, x.dtype) if features and self.cfg.use_tal else None
        return mean, std, (x - mean) / std, vision, text

    def encode(self, x: torch.Tensor) -> Features:
        """The frozen VLM's features for x from the attached encoder (the end-to-end path)."""
        if self._encoder is None:
            raise RuntimeError("TimeVLM needs VLM features: pass `features` or attach_encoder() first")
        return self._encoder(x)

    def modality_tokens(self, x: torch.Tensor,
                        features: Features | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The projected vision and text tokens of the multimodal branch for x (`MultimodalResidual.project`),
        for the alignment losses; (None, None) without the branch."""
        if self.multimodal is None:
            return None, None
        _, _, _, vision, text = self._inputs(x, features)
        return self.multimodal.project(vision, text)

    def forecast_parts(self, x: torch.Tensor, features: Features | None = None) -> dict[str, torch.Tensor]:
        """Eval: the forecast's parts in normalised space ([B, N, pred_len]): "base" (the linear forecast, or the
        flatten head's without `linear_skip`; absent without RAL), one part per switch (`head_scale`: the head's
        residual, `residual_scale`: the gated multimodal residual, or the multimodal forecast without RAL), and
        the de-normalisation ("mean", "std"). `combine` adds them up at any switch values, so validation scores
        every combination of switches from one forward pass."""
        mean, std, xn, vision, text = self._inputs(x, features)
        parts = {"mean": mean, "std": std}
        summary = None
        if self.ral is not None:
            linear, head, summary = self.ral.parts(xn)
            parts.update({"base": linear, "head_scale": head} if linear is not None else {"base": head})
        if self.multimodal is not None:
            parts["residual_scale"] = self.multimodal.residual(summary, vision, text)
        return parts

    @staticmethod
    def combine(parts: dict[str, torch.Tensor], switches: dict[str, torch.Tensor | float]) -> torch.Tensor:
        """The forecast [B, pred_len, N] from `forecast_parts` with each switch's part at its value."""
        y = parts.get("base")
        for name in ("head_scale", "residual_scale"):
            if name in parts:
                part = parts[name] * switches[name] if name in switches else parts[name]
                y = part if y is None else y + part
        return y.permute(0, 2, 1) * parts["std"] + parts["mean"]


def build_model(cfg: ModelConfig) -> nn.Module:
    """The forecasting model named by cfg.model (Time-VLM or a baseline), without any VLM weights loaded; its
    `auto` settings are the model's own (ModelConfig.resolved)."""
    cfg = cfg.resolved()
    if cfg.model == "timevlm":
        return TimeVLM(cfg, *feature_dims(cfg))
    from timevlm.model.baselines import build_baseline

    return build_baseline(cfg)
