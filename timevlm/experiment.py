"""One complete run: data splits -> (cached) VLM features -> model -> fit -> test metrics.

`prepare`, `fit` and `test_metrics` are the steps; a Ray Train worker runs them itself (the platform's worker.py,
with checkpoints and reports between them), `run_experiment` runs them in one call (`python -m timevlm.train`,
benchmarks/fidelity.py).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from timevlm.config import ExperimentConfig
from timevlm.data.registry import get_dataset
from timevlm.data.splits import build_splits
from timevlm.data.windows import SplitData
from timevlm.features import FeatureCache, SplitFeatures
from timevlm.model import build_model
from timevlm.model.contract import Switchable
from timevlm.model.multimodal import MultimodalEncoder, encoder_settings, needs_features
from timevlm.model.vlm import load_vlm
from timevlm.metrics import mae, mse
from timevlm.training import EpochMetrics, TrainState, fit, predict, resolve_device, seed_everything


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    return {"params_total": sum(p.numel() for p in model.parameters()),
            "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


@dataclass
class Prepared:
    cfg: ExperimentConfig
    splits: dict[str, SplitData]
    model: torch.nn.Module
    features: dict[str, SplitFeatures | None] = field(default_factory=dict)
    cache_info: dict[str, Any] = field(default_factory=dict)


def prepare(exp: ExperimentConfig, *, progress: bool = True) -> Prepared:
    """Load the splits, build the model, and get the VLM features: from the cache (computed once per key),
    or through an attached encoder computing them at every step when use_feature_cache is False."""
    mcfg = exp.model  # resolved with the experiment (ExperimentConfig)
    splits = build_splits(exp.data, mcfg.seq_len, mcfg.pred_len, exp.train.seed)
    seed_everything(exp.train.seed)  # the seed decides the initial weights too
    model = build_model(mcfg)
    prepared = Prepared(exp, splits, model, {s: None for s in splits})
    if not model.uses_features:
        return prepared
    device = resolve_device(exp.train.device)
    encoders: dict[str, MultimodalEncoder] = {}

    def make_encoder() -> MultimodalEncoder:
        if "e" not in encoders:
            encoders["e"] = feature_encoder(exp, device)
        return encoders["e"]

    if not exp.train.use_feature_cache:
        model.attach_encoder(make_encoder())
        return prepared
    cache = FeatureCache(exp.train.cache_dir, fallback=exp.train.cache_fallback)
    settings = encoder_settings(mcfg, get_dataset(exp.data.dataset).freq)
    t0 = time.perf_counter()
    for i, (name, split) in enumerate(splits.items()):
        feats = cache.get_or_build(settings, split, make_encoder, progress=progress)
        prepared.features[name] = feats.shuffled(exp.train.seed + i) if exp.train.shuffle_features else feats
    prepared.cache_info = {"cache_hits": cache.stats.hits, "cache_builds": cache.stats.builds,
                           "cache_build_seconds": cache.stats.build_seconds,
                           "cache_seconds": time.perf_counter() - t0, "cache_root": cache.root,
                           "cache_keys": list(cache.stats.keys)}
    return prepared


def feature_plan(exp: ExperimentConfig) -> tuple[dict[str, Any], dict[str, SplitData]] | None:
    """(encoder settings, splits) whose features `prepare` reads from the cache, or None when the model reads
    none. The same experiment `prepare` reads, so a prebuilt entry is exactly the one a trial looks up."""
    mcfg = exp.model
    if not needs_features(mcfg):
        return None
    return (encoder_settings(mcfg, get_dataset(exp.data.dataset).freq),
            build_splits(exp.data, mcfg.seq_len, mcfg.pred_len, exp.train.seed))


def feature_encoder(exp: ExperimentConfig, device: torch.device | str) -> MultimodalEncoder:
    """The frozen VLM with the VAL/TAL front end for this experiment (loads the VLM's weights)."""
    return MultimodalEncoder(exp.model, load_vlm(exp.model, device), get_dataset(exp.data.dataset).freq)


def test_metrics(model: torch.nn.Module, p: Prepared) -> dict[str, float]:
    """MSE/MAE on the scaled test windows; for M4 also SMAPE, MASE and OWA on the original scale."""
    test = p.splits["test"]
    pred, true = predict(model, test, p.features["test"])
    out = {"test_mse": mse(pred, true), "test_mae": mae(pred, true)}
    if test.series is not None:
        from timevlm.data.m4 import m4_metrics

        out.update(m4_metrics(pred, test, test.dataset, p.cfg.data.data_dir))
    return out


def run_experiment(exp: ExperimentConfig, *,
                   on_epoch_end: Callable[[EpochMetrics, TrainState, bool], None] | None = None,
                   resume: TrainState | None = None, prepared: Prepared | None = None) -> dict[str, Any]:
    p = prepared or prepare(exp, progress=exp.train.progress)
    result = fit(p.model, p.splits["train"], p.splits["val"], p.cfg.train,
                 train_feats=p.features["train"], val_feats=p.features["val"],
                 on_epoch_end=on_epoch_end, resume=resume)
    epochs = result.history
    return {
        **test_metrics(p.model, p), "best_val_mse": result.best_val_mse,
        "best_epoch": result.best_epoch, "epochs_run": len(epochs), "stopped_early": result.stopped_early,
        "seconds_per_epoch": float(np.mean([e.seconds for e in epochs])) if epochs else float("nan"),
        "n_train_windows": len(p.splits["train"]), "n_test_windows": len(p.splits["test"]),
        **count_parameters(p.model), **p.cache_info,
        **(p.model.switch_values if isinstance(p.model, Switchable) else {}),
        "history": [e.as_dict() for e in epochs],
    }
