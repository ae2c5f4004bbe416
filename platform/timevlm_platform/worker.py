"""The per-worker training function of a Ray Train run (one Time-VLM training of one trial)."""
from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import mlflow
import torch
from mlflow.tracking import MlflowClient

from timevlm.config import ExperimentConfig
from timevlm.data.windows import SplitData
from timevlm.experiment import Prepared, count_parameters, prepare, test_metrics
from timevlm.features import SplitFeatures
from timevlm.model.contract import unwrap
from timevlm.training import (
    EpochMetrics,
    NonFiniteLossError,
    TrainState,
    fit,
    peak_memory_mb,
)
from timevlm_platform import faults, model_logging, tracking
from timevlm_platform.console import quiet_worker
from timevlm_platform.spool import DurableRun
from timevlm_platform.plots import forecast_plot

STATE_FILE = "train_state.pt"
DIVERGED_FILE = "diverged.json"  # a checkpoint holding this marks a diverged run (read by the driver)


def shard(split: SplitData, feats: SplitFeatures | None, rank: int, world: int):
    """This worker's share of the training windows (and their cached features), for data parallelism: every
    world-th window from `rank`, cut to the same count on every rank (DDP needs the same number of steps on all
    ranks, or the one with an extra batch waits forever in its gradient all-reduce)."""
    if world == 1:
        return split, feats
    rows = slice(rank, len(split) // world * world, world)
    return split.subset(rows), feats.subset(rows) if feats is not None else None


def _weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _data_parallel_record(train: SplitData, model: torch.nn.Module, world: int) -> list[dict] | None:
    """Every rank's shard (its windows' start rows) and a digest of its final weights, gathered on all ranks;
    rank 0 logs it, so a run shows that its ranks trained on disjoint data into one model."""
    if world == 1:
        return None
    mine = {"rank": ray.train.get_context().get_world_rank(), "train_windows": train.starts.tolist(),
            "weights_sha256": _weights_digest(model)}
    everyone: list = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _divergence_in(d: str) -> str | None:
    """The failure text of a checkpoint directory holding the divergence marker, else None."""
    marker = Path(d) / DIVERGED_FILE
    return json.loads(marker.read_text())["failure"] if marker.exists() else None


def _load_resume() -> TrainState | str | None:
    """The state to resume from, or the failure text if the run already diverged, or None."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return _divergence_in(d) or TrainState.from_dict(torch.load(Path(d) / STATE_FILE, weights_only=False))


def diverged_reason(checkpoint: ray.train.Checkpoint | None) -> str | None:
    """Driver side: the failure text when a run ended in divergence."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        return _divergence_in(d)


def _report_divergence(rank: int, last: dict, reason: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        ckpt = None
        if rank == 0:
            (Path(d) / DIVERGED_FILE).write_text(json.dumps({"failure": reason}))
            ckpt = ray.train.Checkpoint.from_directory(d)
        ray.train.report({**last, "epoch": last.get("epoch", 0), "best_val_mse": last.get("best_val_mse", float("inf")),
                          "diverged": 1, "failure": reason}, checkpoint=ckpt)


def _dataset_inputs(p: Prepared) -> list[dict]:
    """The run's Dataset column: each split (train/val/test context) with its source file and a digest of the
    exact scaled values and window starts it trained or was scored on (changes with seq_len, percent, edits)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    from timevlm.data.files import dataset_path
    from timevlm.data.registry import get_dataset

    inputs = []
    for name, split in p.splits.items():
        try:
            source = str(dataset_path(get_dataset(split.dataset), p.cfg.data.data_dir))
        except Exception:  # noqa: BLE001 - M4 reads several files; name the folder then
            source = str(p.cfg.data.data_dir or "")
        digest = hashlib.sha256(np.ascontiguousarray(split.values).tobytes()
                                + np.ascontiguousarray(split.starts).tobytes()).hexdigest()[:10]
        with warnings.catch_warnings():
            # MLflow registers its local-file source class once per URI scheme and warns that a path matches
            # "LocalArtifactDatasetSource, LocalArtifactDatasetSource": the same class twice
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            src = resolve_dataset_source(source) if source else None
        ds = mlflow.data.from_numpy(split.values, source=src, name=f"{split.dataset}-{name}", digest=digest)
        e = ds._to_mlflow_entity()
        inputs.append({"context": name, "dataset": {"name": e.name, "digest": e.digest, "source_type": e.source_type,
                                                    "source": e.source, "schema": e.schema, "profile": e.profile}})
    return inputs


def _log_model_and_plot(run: DurableRun, p: Prepared, model: torch.nn.Module, config: dict[str, Any],
                        metrics: dict[str, float]) -> None:
    """The trained model as an MLflow model (reloadable with mlflow.pyfunc.load_model; its URI becomes a run
    tag), named after its trial and carrying the trial's parameters and test metrics, and a forecast-vs-truth
    plot of three test windows."""
    with tempfile.TemporaryDirectory() as d:
        try:
            run.log_model(model_logging.save_forecast_model(p, model, Path(d) / "model"),
                          name=model_logging.logged_model_name(config.get("model_name", "")),
                          params=config.get("model_params"), metrics=metrics)
        except Exception as e:  # noqa: BLE001 - a model that cannot be saved must not cost the trial's metrics
            print(f"[timevlm-platform] WARNING: could not save the trial's model: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
            run.set_tags({"model_error": f"{type(e).__name__}: {e}"})
        test = p.splits["test"]
        idx = np.linspace(0, len(test) - 1, 3).round().astype(int)
        feats = p.features["test"]
        x = test.inputs(idx)
        with torch.no_grad():
            model.eval()
            pred = model(x.to(next(model.parameters()).device), feats.batch(torch.as_tensor(idx)) if feats else None)
        true = np.stack([test.window(int(i))[1] for i in idx])
        png = forecast_plot(x.numpy(), pred.cpu().numpy(), true, Path(d) / "forecast_test.png",
                            title=f"{p.cfg.data.dataset} test windows {idx.tolist()} (last variable, scaled)")
        run.log_artifact(png, "plots")


def train_worker(config: dict[str, Any]) -> None:
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    exp = ExperimentConfig.from_dict(config["experiment"])
    # rank 0 logs the trial's run; every call goes through a journal that keeps it while MLflow is away
    run = (DurableRun(MlflowClient(config["tracking_uri"]), config["run_id"], config.get("spool_root"))
           if rank == 0 and config.get("run_id") else None)
    quiet_worker()

    p = prepare(exp, progress=rank == 0)
    if run is not None:
        run.log_metrics(tracking.system({
            **count_parameters(p.model), **{k: v for k, v in p.cache_info.items() if k not in ("cache_root", "cache_keys")},
            "n_train_windows": len(p.splits["train"]), "n_val_windows": len(p.splits["val"]),
            "n_test_windows": len(p.splits["test"])}))
        run.log_inputs(_dataset_inputs(p))
    resume = _load_resume()
    if isinstance(resume, str):  # restarted after it had already diverged: say so again, do not retrain
        _report_divergence(rank, {}, resume)
        return
    if run is not None:
        run.set_tags({"ray_node_id": ray.get_runtime_context().get_node_id()})
        if resume is not None:  # a restarted worker: say from where it resumed
            run.log_metrics(tracking.system({"resumed_from_epoch": resume.epoch}))
    poison_at = faults.nan_after_epoch(p.cfg.flat())
    train, train_feats = shard(p.splits["train"], p.features["train"], rank, world)
    model = p.model
    if world > 1:  # DDP over the trial's workers; Ray Train set up the process group (gloo on CPU, NCCL on GPU)
        model = ray.train.torch.prepare_model(model)
    # the last epoch's metrics; after a restart from a checkpoint taken at the very end of training,
    # no epoch runs again, so they come from the checkpoint (Tune needs the metric in the final report)
    last: dict[str, float] = dict(resume.history[-1].as_dict()) if resume is not None and resume.history else {}

    def on_epoch_end(m: EpochMetrics, state: TrainState, improved: bool) -> None:
        # the node and the MLflow run go with every report (Optuna's trials carry the run id as a user attribute)
        metrics = {**m.as_dict(), "node_id": ray.get_runtime_context().get_node_id(),
                   "mlflow_run_id": config.get("run_id")}
        last.update(metrics)
        if run is not None:
            run.log_metrics({**{k: v for k, v in metrics.items() if k != "seconds"},
                             **tracking.system({"seconds": m.seconds})}, step=m.epoch)
        faults.slow_epoch()  # chaos tests only: a longer epoch, so an outage can be timed to fall inside
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save(state.to_dict(), Path(d) / STATE_FILE)
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        # chaos test only (faults.py): make the next loss non-finite, at every epoch's end from `poison_at` on,
        # so that a worker restarted from an earlier checkpoint still diverges
        if poison_at is not None and m.epoch >= poison_at:
            with torch.no_grad():
                for prm in model.parameters():
                    prm.fill_(float("nan"))

    try:
        result = fit(model, train, p.splits["val"], exp.train, train_feats=train_feats,
                     val_feats=p.features["val"], on_epoch_end=on_epoch_end, resume=resume)
    except NonFiniteLossError as e:
        if run is not None:
            run.set_tags({"failure_reason": str(e)})
        _report_divergence(rank, last, str(e))
        return
    ranks = _data_parallel_record(train, unwrap(model), world)
    test = test_metrics(model, p)
    final = {**last, **test, "best_val_mse": result.best_val_mse, "best_epoch": result.best_epoch,
             "epochs_run": len(result.history), "stopped_early": int(result.stopped_early),
             "peak_mem_mb": peak_memory_mb(next(model.parameters()).device)}
    if run is not None:
        run.log_metrics({**test, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
                         **tracking.system({"peak_mem_mb": final["peak_mem_mb"]})})
        # the model carries its test figures; best_val_mse stays the run's per-epoch curve only (a summary point
        # at step 0 would draw every chart of it as a V)
        _log_model_and_plot(run, p, unwrap(model), config, test)
        if ranks is not None:
            with tempfile.TemporaryDirectory() as d:
                (Path(d) / "data_parallel.json").write_text(json.dumps(ranks))
                run.log_artifact(Path(d) / "data_parallel.json")
            run.set_tags({"data_parallel.world_size": world,
                          "data_parallel.weights_identical": len({r["weights_sha256"] for r in ranks}) == 1})
        # the end of the trial: whatever is still journaled is sent now if the server answers soon (else the
        # trial's driver sends it with the run's end, or the study's end does)
        run.flush_until(float(config.get("flush_timeout_s", 20)))
    ray.train.report(final)
