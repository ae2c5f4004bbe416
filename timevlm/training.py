"""A framework-free training loop: fit() with early stopping on validation, evaluate(), reproducible seeds.

The platform calls fit() once per Ray Train worker and receives per-epoch metrics through `on_epoch_end`.
"""
from __future__ import annotations

import copy
import itertools
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from timevlm.config import TrainConfig
from timevlm.errors import ConfigError
from timevlm.data.windows import SplitData, make_loader
from timevlm.features import SplitFeatures
from timevlm.kernels.build import enabled as kernels_enabled
from timevlm.kernels.memory import keep_freed_memory
from timevlm.losses.alignment import AlignmentLosses
from timevlm.losses.forecast import forecast_loss
from timevlm.metrics import mae, mse
from timevlm.model.contract import Aligned, Encoding, Switchable, lr_scale, unwrap


class NonFiniteLossError(FloatingPointError):
    """Training diverged: the loss became NaN or infinite."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process's work on `device`: torch's max allocated on CUDA, else peak resident
    memory of the process (max RSS, which also counts the Python interpreter and libraries)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _features(feats: SplitFeatures | None, idx: torch.Tensor):
    return feats.batch(idx) if feats is not None else None


def _lr_factor(schedule: str, epoch: int, epochs: int) -> float:
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    if schedule == "halving":
        return 0.5 ** epoch
    return 1.0


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_mse: float
    val_mae: float
    lr: float
    seconds: float
    best_val_mse: float
    residual_scale: float | None = None  # Time-VLM: the multimodal residual's scale chosen on validation
    head_scale: float | None = None  # Time-VLM: the patch head's residual on the linear forecast, chosen likewise
    itm_loss: float | None = None  # the weighted alignment losses' epoch means (in train_loss too), when on
    wpa_loss: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass
class TrainState:
    """Everything needed to resume fit() after the epoch it describes. The tensors are the live ones:
    serialise the state (torch.save) inside the callback, do not keep it."""

    epoch: int  # epochs completed
    model: dict[str, Any]
    optimizer: dict[str, Any]
    best_state: dict[str, Any]
    best_val: float
    best_epoch: int
    bad_epochs: int
    history: list[EpochMetrics] = field(default_factory=list)
    rng: dict[str, Any] = field(default_factory=dict)
    ema: dict[str, Any] | None = None  # the weight average's state (train.ema_decay), None without one
    alignment: dict[str, Any] | None = None  # the alignment losses' own weights (the ITM classifier), when on

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["history"] = [h.as_dict() for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainState":
        d = dict(d)
        d["history"] = [EpochMetrics(**h) for h in d["history"]]
        return cls(**d)


@dataclass
class FitResult:
    history: list[EpochMetrics]
    best_epoch: int
    best_val_mse: float
    stopped_early: bool


@torch.no_grad()
def predict(model: nn.Module, split: SplitData, feats: SplitFeatures | None = None, batch_size: int = 256,
            device: torch.device | None = None, amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, truths) over every window of the split, in order ([n, pred_len, n_vars])."""
    device = device or next(model.parameters()).device
    model.eval()
    preds, trues = [], []
    for idx, x, y in make_loader(split, batch_size, shuffle=False):
        with _autocast(device, amp):
            out = model(x.to(device), _features(feats, idx))
        preds.append(out.float().cpu().numpy())
        trues.append(y.numpy())
    return np.concatenate(preds), np.concatenate(trues)


def evaluate(model: nn.Module, split: SplitData, feats: SplitFeatures | None = None, batch_size: int = 256,
             device: torch.device | None = None, amp: bool = False) -> dict[str, float]:
    pred, true = predict(model, split, feats, batch_size, device, amp)
    return {"mse": mse(pred, true), "mae": mae(pred, true)}


def validate(model: nn.Module, val: SplitData, feats: SplitFeatures | None, batch_size: int,
             device: torch.device, amp: bool) -> dict[str, float]:
    """Validation MSE/MAE. A model with residual branches that can be switched off (`switches`, e.g. Time-VLM's
    patch head on its linear forecast and its multimodal residual: {name: (1.0, 0.0)}) is scored at every
    combination and left at the best: a branch is kept only where it lowers validation error, a selection on
    validation data like the choice of epoch. The choices are buffers, so they travel with the state_dict of
    the selected epoch; ties keep the earlier combination (every branch as trained first)."""
    inner = unwrap(model)
    switches = inner.switches if isinstance(inner, Switchable) else {}
    if not switches:
        return evaluate(model, val, feats, batch_size, device, amp)
    choices = [dict(zip(switches, values)) for values in itertools.product(*switches.values())]
    inner.eval()
    preds: list[list[np.ndarray]] = [[] for _ in choices]
    trues = []
    with torch.no_grad():
        for idx, x, y in make_loader(val, batch_size, shuffle=False):
            with _autocast(device, amp):  # one forward pass; every combination of switches from its parts
                parts = inner.forecast_parts(x.to(device), _features(feats, idx))
                for out, choice in zip(preds, choices):
                    out.append(inner.combine(parts, choice).float().cpu().numpy())
            trues.append(y.numpy())
    true = np.concatenate(trues)
    scored = [({"mse": mse(np.concatenate(p), true), "mae": mae(np.concatenate(p), true)}, choice)
              for p, choice in zip(preds, choices)]
    best, choice = min(scored, key=lambda s: s[0]["mse"])
    for name, value in choice.items():
        inner.set_switch(name, value)
    return {**best, **choice}


def _train_mode(model: nn.Module) -> None:
    model.train()
    inner = unwrap(model)
    for name, choices in (inner.switches if isinstance(inner, Switchable) else {}).items():
        inner.set_switch(name, choices[0])  # training always sees every branch as learned


def _ema_with_warmup(decay: float) -> Callable:
    """torch.optim.swa_utils' EMA update with the decay ramped up as min(decay, (1 + n) / (10 + n)) over the
    first updates: a fixed 0.999 would still hold 78% of the random initial weights after ETTh1's first epoch
    (265 steps), and at seq_len 512 the best epoch is often the first or second."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        n = float(n_averaged)
        torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n) / (10.0 + n)))

    return update


def _weight_average(model: nn.Module, decay: float | None) -> AveragedModel | None:
    """An exponential moving average of `model`'s parameters (torch.optim.swa_utils), or None. Buffers are not
    averaged (a memory bank's slots, Time-VLM's `initialized` flag): `_sync_buffers` copies the live ones in."""
    if decay is None:
        return None
    encoder = model.encoder if isinstance(model, Encoding) else None  # shared, never copied
    if encoder is not None:
        model.attach_encoder(None)
    try:
        return AveragedModel(model, multi_avg_fn=_ema_with_warmup(decay), use_buffers=False)
    finally:
        if encoder is not None:
            model.attach_encoder(encoder)


@torch.no_grad()
def _sync_buffers(ema: AveragedModel, model: nn.Module) -> nn.Module:
    """The average, with the live model's buffers. In a data-parallel trial each rank's last forward updated its
    memory bank from its own shard: rank 0's buffers go to every rank first, as DDP does before each forward."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for live in model.buffers():
            torch.distributed.broadcast(live, 0)
    for avg, live in zip(ema.module.buffers(), model.buffers()):
        avg.copy_(live)
    if isinstance(model, Encoding):
        ema.module.attach_encoder(model.encoder)
    return ema.module


def _unwrapped(state: dict[str, Any]) -> dict[str, Any]:
    """A model state_dict with the "module." prefix of a DDP wrapper removed (a copy; unprefixed ones as they
    are), so a checkpoint resumes whether it was written by a data-parallel trial or not, and whether the resumed
    trial is one: older data-parallel checkpoints kept their best weights with the wrapper's keys."""
    state = copy.copy(state)
    torch.nn.modules.utils.consume_prefix_in_state_dict_if_present(state, "module.")
    return state


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for the device (CPU, CUDA): one pass over the parameters
    instead of a dozen per tensor. Elsewhere (MPS, ...) torch's default implementation. A parameter with an
    learning-rate scale (contract.set_lr_scale, e.g. Time-VLM's flatten head) trains at that multiple of the
    learning rate: one parameter group per scale, each with its `lr_scale` (see `set_learning_rate`)."""
    fused = True if device.type in ("cpu", "cuda") else None
    scales: dict[float, list[nn.Parameter]] = {}
    for p in params:
        scales.setdefault(lr_scale(p), []).append(p)
    groups = [{"params": ps, "lr": cfg.lr * scale, "lr_scale": scale} for scale, ps in scales.items()]
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def set_learning_rate(opt: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group at `lr` times its `lr_scale`."""
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _alignment(model: nn.Module, cfg: TrainConfig, device: torch.device) -> AlignmentLosses | None:
    """The alignment losses `cfg` asks for, on the model's projected modality tokens; None when all are off."""
    if not (cfg.itm_weight or cfg.wpa_weight):
        return None
    dim = model.modality_dim if isinstance(model, Aligned) else None
    if dim is None:
        raise ValueError(f"itm_weight / wpa_weight align vision with text: {type(model).__name__} needs both its "
                         f"vision and text learners (use_val and use_tal) for them")
    return AlignmentLosses(dim, cfg.itm_weight, cfg.wpa_weight).to(device)


def configure_process(cfg: TrainConfig, device: torch.device) -> None:
    """What a training process sets for itself, once, before its first step: its threads, and on CPU the
    allocator setting the step wants (its activations reuse their pages instead of faulting fresh ones in)."""
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if device.type == "cpu" and kernels_enabled():
        keep_freed_memory()


class TrainStep:
    """One optimisation step of `fit`, in two halves so the loop can check the loss in between: `loss` (forward
    under the configured autocast, the forecast's loss plus the alignment losses that are on) and `update`
    (backward, gradient clipping, AdamW, the weight average). benchmarks/step_speed.py times exactly this."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
        if not cfg.is_resolved:
            raise ConfigError("the TrainConfig still says `auto` (ema_decay or forecast_loss), which only the model "
                              "decides: train with ExperimentConfig(...).train, or TrainConfig.resolved(model_name)")
        self.model = model
        self.inner = unwrap(model)
        self.alignment = _alignment(self.inner, cfg, device)
        self.forecast_loss = cfg.forecast_loss
        self.parts: dict[str, torch.Tensor] = {}  # the last step's weighted alignment losses, by name
        self.params = [p for p in model.parameters() if p.requires_grad]
        if self.alignment is not None:
            self.params += list(self.alignment.parameters())
        self.opt = make_optimizer(self.params, cfg, device)
        self.ema = _weight_average(self.inner, cfg.ema_decay)
        self.amp = cfg.amp and device.type == "cuda"
        self.device, self.grad_clip = device, cfg.grad_clip

    def loss(self, x: torch.Tensor, feats: Any, y: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device, self.amp):
            if self.alignment is not None and feats is None:  # end-to-end: encode once for forecast and alignment
                feats = self.inner.encode(x)
            loss = forecast_loss(self.model(x, feats).float(), y, self.forecast_loss)
            if self.alignment is None:
                return loss
            vision, text = self.inner.modality_tokens(x, feats)
            self.parts = self.alignment(vision.float(), text.float())
            return loss + sum(self.parts.values())

    def update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        self.opt.step()
        if self.ema is not None:
            self.ema.update_parameters(self.inner)


def fit(model: nn.Module, train: SplitData, val: SplitData, cfg: TrainConfig, *,
        train_feats: SplitFeatures | None = None, val_feats: SplitFeatures | None = None,
        on_epoch_end: Callable[[EpochMetrics, TrainState, bool], None] | None = None,
        resume: TrainState | None = None) -> FitResult:
    """Train with `cfg.forecast_loss` (MSE by default) plus the alignment losses that are on; after each epoch
    evaluate on validation, keep the best weights, stop after `patience` epochs without improvement, and load the
    best weights back into `model` at the end. With `cfg.ema_decay` the weights validated, kept and loaded back
    are the moving average of the trained ones."""
    device = resolve_device(cfg.device)
    configure_process(cfg, device)
    seed_everything(cfg.seed)
    model.to(device)
    loader = make_loader(train, cfg.batch_size, shuffle=True, seed=cfg.seed)
    train_step = TrainStep(model, cfg, device)
    opt, ema, inner, amp = train_step.opt, train_step.ema, train_step.inner, train_step.amp
    alignment = train_step.alignment

    if resume is not None:
        inner.load_state_dict(_unwrapped(resume.model))
        opt.load_state_dict(resume.optimizer)
        start, best_val, best_epoch, bad = resume.epoch, resume.best_val, resume.best_epoch, resume.bad_epochs
        best_state, history = _unwrapped(resume.best_state), list(resume.history)
        if resume.rng:
            torch.set_rng_state(resume.rng["torch"])
            loader.generator.set_state(resume.rng["loader"])
        if ema is not None and resume.ema is not None:
            ema.load_state_dict(resume.ema)
        if alignment is not None and resume.alignment is not None:
            alignment.load_state_dict(resume.alignment)
    else:
        start, best_val, best_epoch, bad, history = 0, float("inf"), -1, 0, []
        best_state = copy.deepcopy(inner.state_dict())

    stopped_early = False
    for epoch in range(start, cfg.epochs):
        if bad >= cfg.patience:
            stopped_early = True
            break
        lr = cfg.lr * _lr_factor(cfg.lr_schedule, epoch, cfg.epochs)
        set_learning_rate(opt, lr)
        _train_mode(model)
        t0, total, count, aligned = time.perf_counter(), 0.0, 0, {}
        bar = tqdm(loader, disable=not cfg.progress, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for step, (idx, x, y) in enumerate(bar):
            x, y = x.to(device), y.to(device)
            loss = train_step.loss(x, _features(train_feats, idx), y)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"loss is {loss.item()} at epoch {epoch + 1}, step {step + 1}")
            train_step.update(loss)
            total += loss.item() * len(x)
            count += len(x)
            for name, part in train_step.parts.items():
                aligned[name] = aligned.get(name, 0.0) + part.item() * len(x)
            bar.set_postfix(loss=f"{total / count:.4f}")
        scored = model if ema is None else _sync_buffers(ema, inner)  # model: DDP's forward syncs buffers
        scores = validate(scored, val, val_feats, max(cfg.batch_size, 256), device, amp)
        improved = scores["mse"] < best_val
        if improved:
            best_val, best_epoch, bad = scores["mse"], epoch, 0
            best_state = copy.deepcopy(unwrap(scored).state_dict())
        else:
            bad += 1
        m = EpochMetrics(epoch=epoch + 1, train_loss=total / max(count, 1), val_mse=scores["mse"],
                         val_mae=scores["mae"], lr=lr, seconds=time.perf_counter() - t0, best_val_mse=best_val,
                         residual_scale=scores.get("residual_scale"), head_scale=scores.get("head_scale"),
                         **{f"{name}_loss": value / max(count, 1) for name, value in aligned.items()})
        history.append(m)
        if on_epoch_end is not None:
            state = TrainState(epoch + 1, model.state_dict(), opt.state_dict(), best_state, best_val, best_epoch,
                               bad, history, {"torch": torch.get_rng_state(), "loader": loader.generator.get_state()},
                               None if ema is None else ema.state_dict(),
                               None if alignment is None else alignment.state_dict())
            on_epoch_end(m, state, improved)
    inner.load_state_dict(best_state)
    return FitResult(history, best_epoch + 1, best_val, stopped_early)
