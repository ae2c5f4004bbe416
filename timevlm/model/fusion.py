"""The multimodal branch as a gated residual on the temporal forecast.

Per variable, a query (the variable's temporal summary plus a learned variable embedding) attends over the
frozen VLM's vision and text tokens; the attended vector predicts a correction to the temporal forecast,
which is added through a sigmoid gate computed from both:

    forecast = temporal + scale * gate(query, attended) * correction(attended)

It starts closed: the correction's output layer is zero-initialised, so an untrained model forecasts exactly
what its temporal branch does, and the branch only moves away from that where the training loss says so.
What it learns from the frozen features is regularised by dropout on the projected tokens (`mm_dropout`) and
a LayerNorm on the raw features (their scale differs by encoder). `scale` is a buffer the training loop sets
on validation data (1 = as learned, 0 = closed; `TimeVLM.switches`): the branch cannot make the selected
model worse than its own temporal forecast on validation data.

Without the RAL there is no temporal forecast to correct: the attended vector forecasts directly.
"""
from __future__ import annotations

import torch
from torch import nn

from timevlm.config import ModelConfig
from timevlm.model.layers import Dropout, multihead_attention


class MultimodalResidual(nn.Module):
    def __init__(self, cfg: ModelConfig, vision_dim: int, text_dim: int) -> None:
        super().__init__()
        f = cfg.d_fusion
        self.vision_proj = (nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, f))
                            if cfg.use_val else None)
        self.text_proj = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, f)) if cfg.use_tal else None
        self.modality = nn.Parameter(torch.randn(2, f) * 0.02)  # which tokens are vision, which text
        self.var_embed = nn.Parameter(torch.randn(cfg.n_vars, f) * 0.02)  # distinguishes variables' queries
        self.query_proj = nn.Linear(cfg.d_model, f) if cfg.use_ral else None
        self.token_drop = Dropout(cfg.mm_dropout)
        self.mm_norm = nn.LayerNorm(f)
        self.cross = nn.MultiheadAttention(f, cfg.n_heads, batch_first=True)  # weights for multihead_attention
        self.correction = nn.Sequential(nn.LayerNorm(f), Dropout(cfg.mm_dropout), nn.Linear(f, cfg.pred_len))
        nn.init.zeros_(self.correction[-1].weight)
        nn.init.zeros_(self.correction[-1].bias)
        self.gate = nn.Linear(2 * f, 1) if cfg.use_ral else None
        self.register_buffer("scale", torch.ones(()))

    def forward(self, temporal: torch.Tensor | None, summary: torch.Tensor | None, vision: torch.Tensor | None,
                text: torch.Tensor | None) -> torch.Tensor:
        """temporal [B, N, pred_len] and summary [B, N, d_model] (both None without RAL), vision [B, Kv, Dv],
        text [B, Kt, Dt] (None when that branch is off) -> forecast [B, N, pred_len] (normalised space)."""
        delta = self.residual(summary, vision, text)
        return delta if temporal is None else temporal + self.scale * delta

    def project(self, vision: torch.Tensor | None,
                text: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The VLM's tokens in the branch's width, marked by modality: vision [B, Kv, F], text [B, Kt, F] (None for
        a branch that is off). What the cross-attention reads, and what the alignment losses align."""
        v = self.vision_proj(vision) + self.modality[0] if self.vision_proj is not None else None
        t = self.text_proj(text) + self.modality[1] if self.text_proj is not None else None
        return v, t

    def residual(self, summary: torch.Tensor | None, vision: torch.Tensor | None,
                 text: torch.Tensor | None) -> torch.Tensor:
        """The gated correction (gate x correction, [B, N, pred_len]) that `forward` adds to the temporal
        forecast at `scale`; without RAL, the multimodal forecast itself."""
        tokens = [t for t in self.project(vision, text) if t is not None]
        mm = self.mm_norm(self.token_drop(torch.cat(tokens, dim=1)))  # [B, Kv + Kt, F]
        batch = mm.shape[0]
        query = self.var_embed.unsqueeze(0).expand(batch, -1, -1)
        if self.query_proj is not None:
            query = query + self.query_proj(summary)
        attended = multihead_attention(self.cross, query, mm)
        correction = self.correction(attended)
        if self.gate is None:  # w/o RAL: the multimodal branch forecasts alone
            return correction
        gate = torch.sigmoid(self.gate(torch.cat([query, attended], dim=-1)))  # [B, N, 1]
        return gate * correction
