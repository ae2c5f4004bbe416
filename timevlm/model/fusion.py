"""Gated fusion: per-variable temporal features attend over vision and text tokens, then a learned gate mixes."""
from __future__ import annotations

import torch
from torch import nn

from timevlm.config import ModelConfig


class GatedFusion(nn.Module):
    def __init__(self, cfg: ModelConfig, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        f = cfg.d_fusion
        self.vision_proj = nn.Linear(vision_dim, f) if cfg.use_val else None
        self.text_proj = nn.Linear(text_dim, f) if cfg.use_tal else None
        self.modality = nn.Parameter(torch.randn(2, f) * 0.02)  # which tokens are vision, which text
        self.var_embed = nn.Parameter(torch.randn(cfg.n_vars, f) * 0.02)  # distinguishes variables' queries
        self.mm_norm = nn.LayerNorm(f)
        self.cross = nn.MultiheadAttention(f, cfg.n_heads, dropout=cfg.dropout, batch_first=True)
        self.gate = nn.Linear(2 * f, f)

    @property
    def uses_multimodal(self) -> bool:
        return self.vision_proj is not None or self.text_proj is not None

    def forward(self, temporal: torch.Tensor | None, vision: torch.Tensor | None,
                text: torch.Tensor | None, batch: int) -> torch.Tensor:
        """temporal [B, N, F] (None without RAL) -> fused [B, N, F]."""
        if not self.uses_multimodal:
            assert temporal is not None
            return temporal
        tokens = []
        if self.vision_proj is not None:
            tokens.append(self.vision_proj(vision) + self.modality[0])
        if self.text_proj is not None:
            tokens.append(self.text_proj(text) + self.modality[1])
        mm = self.mm_norm(torch.cat(tokens, dim=1))  # [B, Kv + Kt, F]
        base = self.var_embed.unsqueeze(0).expand(batch, -1, -1)
        query = base if temporal is None else temporal + base
        attended, _ = self.cross(query, mm, mm)
        if temporal is None:  # w/o RAL: the forecast comes from the multimodal branch alone
            return attended
        g = torch.sigmoid(self.gate(torch.cat([temporal, attended], dim=-1)))
        return g * temporal + (1 - g) * attended
