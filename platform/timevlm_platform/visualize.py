"""`python tune.py visualize --run-id RUN`: look at what a trained trial sees and predicts.

Downloads the trial's logged MLflow model (its weights and resolved experiment config), rebuilds the test
split, and saves (1) the VAL images of a few test windows, each with its three channels and its TAL prompt,
and (2) forecast-vs-truth plots of those windows.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import mlflow.artifacts
import numpy as np
import torch
from mlflow.tracking import MlflowClient

from timevlm.config import ExperimentConfig, RunEnv
from timevlm.data.registry import get_dataset
from timevlm.errors import ConfigError
from timevlm.experiment import prepare
from timevlm.model.multimodal import MultimodalEncoder
from timevlm_platform import tracking
from timevlm_platform.plots import forecast_plot, image_grid


def visualize(run_id: str, tracking_uri: str | None, out: str, n_windows: int = 4,
              data_dir: str | None = None, cache_dir: str | None = None) -> list[Path]:
    from timevlm_platform.settings import platform_home

    uri = tracking_uri or tracking.default_tracking_uri(platform_home())
    tracking.check_reachable(uri)
    client = MlflowClient(uri)
    model_uri = client.get_run(run_id).data.tags.get(tracking.MODEL_URI_TAG)
    if not model_uri:
        raise ConfigError(f"run {run_id} has no logged model (tag {tracking.MODEL_URI_TAG}): did the trial finish?")
    with tempfile.TemporaryDirectory() as d:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=d, tracking_uri=uri)) / "artifacts"
        exp = ExperimentConfig.from_dict(json.loads((local / "experiment.json").read_text()))
        state = torch.load(local / "weights.pt", weights_only=True)
    exp = exp.placed(RunEnv(data_dir=data_dir, cache_dir=cache_dir))  # this machine's data and cache
    p = prepare(exp)
    p.model.load_state_dict(state)
    p.model.eval()
    test = p.splits["test"]
    idx = np.linspace(0, len(test) - 1, n_windows).round().astype(int)
    x = test.inputs(idx)
    feats = p.features["test"]
    with torch.no_grad():
        pred = p.model(x, feats.batch(torch.as_tensor(idx)) if feats is not None else None)
    true = np.stack([test.window(int(i))[1] for i in idx])
    dest = Path(out) / run_id
    dest.mkdir(parents=True, exist_ok=True)
    files = [forecast_plot(x.numpy(), pred.numpy(), true, dest / "forecast_vs_truth.png",
                           title=f"{test.dataset} test windows {idx.tolist()} (last variable, scaled)")]
    if exp.model.model == "timevlm":
        enc = MultimodalEncoder(p.cfg.model, adapter=None, freq=get_dataset(test.dataset).freq)  # images/prompts only
        images = enc.images(x).numpy()
        prompts = enc.prompts(x)
        files.append(image_grid(images, dest / "val_images.png", titles=[f"window {i}" for i in idx]))
        (dest / "prompts.txt").write_text("\n".join(f"window {i}: {t}" for i, t in zip(idx, prompts)))
        files.append(dest / "prompts.txt")
    for f in files:
        print(f"wrote {f}")
    return files
