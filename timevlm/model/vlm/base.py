"""The adapter interface every frozen VLM implements, device-side preprocessing and weight fingerprints."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from timevlm.config import ModelConfig
from timevlm.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VLMAdapter(nn.Module):
    """A frozen VLM. `encode` maps images in [0, 1] and prompts to token features:
    vision [B, Kv, vision_dim] and text [B, Kt, text_dim]. Subclasses set the attributes below."""

    name: str = ""
    vision_dim: int = 0
    text_dim: int = 0
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vision_tokens = cfg.vision_tokens
        self.max_tokens = cfg.max_prompt_tokens

    def freeze(self) -> "VLMAdapter":
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True) -> "VLMAdapter":  # always frozen: BN/dropout stay in eval mode
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Resize to the encoder's input size and normalise, batched on the images' device."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False)
        mean = torch.tensor(self.mean, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return (images - mean) / std

    def pool_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, vision_tokens, D] by adaptive average pooling along the token axis."""
        return F.adaptive_avg_pool1d(tokens.transpose(1, 2), self.vision_tokens).transpose(1, 2)

    # Class-level facts, available without loading weights (so a cached run never loads the VLM):
    # dims(cfg) -> (vision_dim, text_dim); native_size(cfg) -> input side; weights_id(cfg) -> identity
    # of the weights (part of the feature-cache key).

    def encode(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def file_fingerprint(paths: list[Path]) -> str:
    """Hash of names, sizes and the first and last 4 MiB of each weight file (fast for multi-GB files)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        size = p.stat().st_size
        h.update(f"{p.name}:{size}".encode())
        with open(p, "rb") as f:
            h.update(f.read(4 << 20))
            if size > 8 << 20:
                f.seek(-(4 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()[:16]


VLM_ADAPTERS: Registry[Callable[[ModelConfig], VLMAdapter]] = Registry("VLM")


def load_vlm(cfg: ModelConfig, device: torch.device | str = "cpu") -> VLMAdapter:
    """The variant's frozen encoders on `device`. transformers draws a progress bar for every weight file it
    reads (a "Loading weights 103/103" line per load, in every trial and every pyfunc load, for a read that takes
    milliseconds): off while loading, then back as it was."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        adapter = VLM_ADAPTERS.get(cfg.vlm)(cfg)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return adapter.freeze().to(device)


def feature_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(vision_dim, text_dim) of a variant without loading its weights."""
    return VLM_ADAPTERS.get(cfg.vlm).dims(cfg)  # type: ignore[attr-defined]


def vlm_identity(cfg: ModelConfig) -> dict[str, object]:
    """What of the VLM changes its features: variant, weights and input size."""
    cls = VLM_ADAPTERS.get(cfg.vlm)
    return {"vlm": cfg.vlm, "weights": cls.weights_id(cfg), "vlm_input_size": cls.native_size(cfg),  # type: ignore[attr-defined]
            "int8": cfg.vlm_int8}
