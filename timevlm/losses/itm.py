"""Image-text matching (ITM): in each batch a share of the windows get another window's text features; one
linear classifier on the pair's fused representation says whether vision and text come from the same window;
binary cross-entropy. It asks the projections of both modalities to keep what the two views of a window share.

The fused representation of a pair is [v, t, v * t] over the mean of each modality's tokens: the product is
what lets a linear classifier see agreement between the two."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageTextMatching(nn.Module):
    def __init__(self, width: int, mismatched: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < mismatched < 1.0:
            raise ValueError(f"the mismatched share must be in (0, 1), got {mismatched}")
        self.classifier = nn.Linear(3 * width, 1)
        self.mismatched = mismatched

    def logits(self, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        v, t = vision.mean(1), text.mean(1)  # [B, F]
        return self.classifier(torch.cat([v, t, v * t], dim=-1)).squeeze(-1)

    def forward(self, vision: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """vision [B, Kv, F], text [B, Kt, F] of the same B windows -> the ITM loss (0 for a batch of one)."""
        batch = vision.shape[0]
        if batch < 2:
            return vision.sum() * 0.0
        swap = torch.rand(batch, device=vision.device) < self.mismatched
        shift = int(torch.randint(1, batch, ()))  # every swapped window takes a different window's text
        paired = torch.where(swap[:, None, None], text.roll(shift, 0), text)
        return F.binary_cross_entropy_with_logits(self.logits(vision, paired), (~swap).float())
