"""What a forecasting network offers the code that trains, validates and serves it (timevlm.training,
timevlm.experiment, the platform's worker and pyfunc), declared as Protocols, as GluonTS separates a network from
its training module: the loop asks `isinstance(model, Switchable)`, never whether an attribute happens to exist.

A new model provides `Forecaster` (every model) and any of the optional capabilities below that it has. A
parameter that should train at a multiple of the learning rate says so with `set_lr_scale`.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from timevlm.model.multimodal import Features, MultimodalEncoder


@runtime_checkable
class Forecaster(Protocol):
    """Every model: `model(x [B, seq_len, N], features) -> [B, pred_len, N]`. `uses_features`: whether the
    forward pass reads the frozen VLM's features (from the cache, or from an attached encoder)."""

    uses_features: bool

    def __call__(self, x: torch.Tensor, features: Features | None = None) -> torch.Tensor: ...


@runtime_checkable
class Switchable(Protocol):
    """Residual branches that validation may close (training.validate): `switches` maps each branch to its
    choices, the first being the model as trained; `forecast_parts` computes the forecast's parts once and
    `combine` adds them up at any choice, so every combination is scored from one forward pass. The choices are
    buffers, so the one selected travels with the state_dict; `switch_values` reports it."""

    @property
    def switches(self) -> dict[str, tuple[float, ...]]: ...

    @property
    def switch_values(self) -> dict[str, float]: ...

    def set_switch(self, name: str, value: float) -> None: ...

    def forecast_parts(self, x: torch.Tensor, features: Features | None = None) -> dict[str, torch.Tensor]: ...

    def combine(self, parts: dict[str, torch.Tensor], switches: dict[str, torch.Tensor | float]) -> torch.Tensor:
        ...


@runtime_checkable
class Encoding(Protocol):
    """A model that can compute its features itself from an attached frozen encoder (the end-to-end path). The
    encoder is never a submodule: it is shared, not copied (the weight average) and never checkpointed."""

    @property
    def encoder(self) -> MultimodalEncoder | None: ...

    def attach_encoder(self, encoder: MultimodalEncoder | None) -> nn.Module: ...

    def encode(self, x: torch.Tensor) -> Features: ...


@runtime_checkable
class Aligned(Protocol):
    """A model whose projected vision and text tokens the alignment losses (train.itm_weight, wpa_weight) can
    train: `modality_dim` is their width, None where the model lacks the vision or the text learner."""

    @property
    def modality_dim(self) -> int | None: ...

    def modality_tokens(self, x: torch.Tensor, features: Features | None = None
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None]: ...


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a data-parallel wrapper (DDP in data-parallel trials), or the model itself."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


_LR_SCALE = "lr_scale"


def set_lr_scale(param: nn.Parameter, scale: float) -> None:
    """Train `param` at `scale` times the learning rate (training.make_optimizer groups parameters by it)."""
    setattr(param, _LR_SCALE, float(scale))


def lr_scale(param: nn.Parameter) -> float:
    return float(getattr(param, _LR_SCALE, 1.0))
