"""The Tune trainable of one trial (Train V2 pattern): build a TorchTrainer for the sampled config and fit it.

Worker metrics reach Tune through TuneReportCallback; the trial's MLflow child run is created (or found
again, after a restart) here and handed to the rank-0 worker.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.tune
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from timevlm_platform import tracking
from timevlm_platform.study import CELL_KEY, Cell, StudySpec
from timevlm_platform.worker import diverged_reason, train_worker


class TrialDiverged(RuntimeError):
    """The trial's training loss became NaN/inf; the trial fails, the study goes on."""


@dataclass
class TrialContext:
    """What every trial of one Tune experiment shares (one cell, or several cells of a grid study, told apart
    by the trial's `cell` parameter); bound with tune.with_parameters."""

    spec: StudySpec
    cells: dict[str, Cell]  # by label
    run_name: str  # stable Tune experiment name
    storage_path: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    data_dir: str
    cache_dir: str
    use_feature_cache: bool = True
    worker_max_failures: int = 2

    def cell_of(self, config: dict[str, Any]) -> Cell:
        return self.cells[config[CELL_KEY]] if CELL_KEY in config else next(iter(self.cells.values()))


def trial_run_name(cell: Cell, config: dict[str, Any], trial_id: str) -> str:
    """A short MLflow run name that tells trials apart at a glance: the cell, what this trial sets, its id,
    e.g. `ETTh1-96 variant=w/o VAL seed=2022 #00003`."""
    def short(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = " ".join(f"{k.split('.')[-1]}={short(v)}" for k, v in config.items() if k != CELL_KEY)
    return " ".join(filter(None, [cell.label, values, f"#{trial_id.rsplit('_', 1)[-1]}"]))


def train_driver(config: dict[str, Any], ctx: TrialContext) -> None:
    tctx = ray.tune.get_context()
    trial_id = tctx.get_trial_id()
    spec = ctx.spec
    cell = ctx.cell_of(config)
    exp = spec.experiment(cell.dataset, cell.horizon, {k: v for k, v in config.items() if k != CELL_KEY},
                          cell.test_dataset)
    exp = dataclasses.replace(
        exp,
        data=dataclasses.replace(exp.data, data_dir=ctx.data_dir),
        train=dataclasses.replace(exp.train, cache_dir=ctx.cache_dir, progress=False,
                                  use_feature_cache=ctx.use_feature_cache,
                                  num_threads=exp.train.num_threads or spec.resources.cpus_per_worker))
    client = MlflowClient(ctx.tracking_uri)
    run_id = tracking.safe("create trial run", lambda: tracking.child_run(
        client, ctx.experiment_id, ctx.parent_run_id, trial_id, trial_run_name(cell, config, trial_id),
        {"dataset": cell.dataset, "test_dataset": cell.test_dataset or cell.dataset, "pred_len": str(cell.horizon),
         tracking.STUDY_TAG: spec.name}))
    if run_id:
        tracking.safe("log trial params", lambda: tracking.log_params(
            client, run_id, {**exp.flat(), **{f"searched.{k}": v for k, v in config.items()}}))

    res = spec.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"experiment": exp.to_dict(), "tracking_uri": ctx.tracking_uri, "run_id": run_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker,
                                  **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=f"{ctx.run_name}-{trial_id}", storage_path=f"{ctx.storage_path}/train_runs",
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ctx.worker_max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        if run_id:
            tracking.safe("mark trial failed", lambda: tracking.finish(client, run_id, False, f"{type(e).__name__}: {e}"))
        raise
    reason = diverged_reason(result.checkpoint)
    if reason:
        if run_id:
            tracking.safe("mark trial diverged", lambda: tracking.finish(client, run_id, False, f"diverged: {reason}"))
        raise TrialDiverged(reason)
    if run_id:
        tracking.safe("finish trial run", lambda: tracking.finish(client, run_id, True))
