"""The weighted alignment losses a training step adds to the forecast's: itm_weight x ITM + wpa_weight x WPA,
on the multimodal branch's projected vision and text tokens."""
from __future__ import annotations

import torch
from torch import nn

from timevlm.losses.itm import ImageTextMatching
from timevlm.losses.wpa import wpa_loss


class AlignmentLosses(nn.Module):
    """Holds the ITM classifier (trained beside the model, not part of it: a forecast never uses it)."""

    def __init__(self, width: int, itm_weight: float = 0.0, wpa_weight: float = 0.0) -> None:
        super().__init__()
        self.itm_weight, self.wpa_weight = itm_weight, wpa_weight
        self.itm = ImageTextMatching(width) if itm_weight > 0 else None

    def forward(self, vision: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each weighted loss by name ("itm", "wpa"), for the step to add and the loop to report."""
        out = {}
        if self.itm is not None:
            out["itm"] = self.itm_weight * self.itm(vision, text)
        if self.wpa_weight > 0:
            out["wpa"] = self.wpa_weight * wpa_loss(text, vision)
        return out
