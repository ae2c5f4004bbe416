"""The frozen half of Time-VLM: window -> (VAL image, TAL prompt) -> VLM token features.

With no learnable part and no gradient, its output depends only on the window and on `encoder_settings`;
`timevlm.features` caches it on that basis.
"""
from __future__ import annotations

from typing import TypedDict

import torch

from timevlm.config import ModelConfig
from timevlm.model.tal import build_prompts
from timevlm.model.val import series_to_image
from timevlm.model.vlm.base import VLMAdapter, vlm_identity

# Bump when the image or prompt construction changes: it is part of every cache key.
ENCODER_CODE_VERSION = "val1-tal2"


class Features(TypedDict):
    vision: torch.Tensor  # [B, Kv, vision_dim]
    text: torch.Tensor  # [B, Kt, text_dim]


# The model settings the frozen half's output depends on: `encoder_settings` (the feature-cache key) reads these and
# no other field of ModelConfig, and the study's up-front build (prebuild) groups trials by them
FEATURE_FIELDS = ("seq_len", "pred_len", "periodicity", "image_size", "top_k_freqs", "vision_tokens",
                  "max_prompt_tokens", "dataset_description", "prompt_description", "vlm", "vlm_path",
                  "vlm_input_size", "vlm_int8")


def needs_features(cfg: ModelConfig) -> bool:
    """Whether a model with these settings reads the frozen VLM's features (Time-VLM with VAL or TAL on)."""
    return cfg.model == "timevlm" and (cfg.use_val or cfg.use_tal)


def encoder_settings(cfg: ModelConfig, freq: str = "") -> dict[str, object]:
    """Everything that changes the encoder's output besides the window itself (no weights are loaded).
    norm_const, d_model and d_fusion are absent: images are min-max scaled and prompts use the window's
    own values, so trials that differ only in those share features."""
    return {"code": ENCODER_CODE_VERSION, **vlm_identity(cfg),
            "seq_len": cfg.seq_len, "pred_len": cfg.pred_len, "periodicity": cfg.periodicity,
            "image_size": cfg.image_size, "top_k_freqs": cfg.top_k_freqs, "vision_tokens": cfg.vision_tokens,
            "max_prompt_tokens": cfg.max_prompt_tokens, "description": prompt_description(cfg), "freq": freq}


def prompt_description(cfg: ModelConfig) -> str:
    """What the prompts end with: the dataset's description where `prompt_description` asks for it, else nothing."""
    return cfg.dataset_description if cfg.prompt_description else ""


class MultimodalEncoder:
    def __init__(self, cfg: ModelConfig, adapter: VLMAdapter, freq: str = "") -> None:
        self.cfg, self.adapter, self.freq = cfg, adapter, freq

    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return series_to_image(x, self.cfg.periodicity, self.cfg.image_size, self.cfg.top_k_freqs)

    def prompts(self, x: torch.Tensor) -> list[str]:
        return build_prompts(x, seq_len=self.cfg.seq_len, pred_len=self.cfg.pred_len,
                             description=prompt_description(self.cfg), freq=self.freq)

    def __call__(self, x: torch.Tensor) -> Features:
        with torch.inference_mode():
            x = x.to(self.device)
            vision, text = self.adapter.encode(self.images(x), self.prompts(x))
        # cloned outside inference mode: the end-to-end path feeds them to layers that save inputs for backward
        return {"vision": vision.float().clone(), "text": text.float().clone()}
