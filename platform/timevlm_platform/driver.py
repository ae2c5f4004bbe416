"""The Tune trainable of one trial (Train V2 pattern): build a TorchTrainer for the sampled config and fit it.

Worker metrics reach Tune through TuneReportCallback; the trial's MLflow child run is created (or found
again, after a restart) here and handed to the rank-0 worker.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import ray.train
import ray.tune
from mlflow.tracking import MlflowClient
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from timevlm.config import ExperimentConfig, RunEnv
from timevlm.overrides import short_name
from timevlm_platform import study_results, tracking
from timevlm_platform.console import quiet_worker
from timevlm_platform.spool import DurableRun
from timevlm_platform.study import CELL_KEY, VARIANT_KEY, Cell, StudySpec
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
    env: RunEnv  # where trials find the data and the feature cache on this cluster (run tags, never params)
    worker_max_failures: int = 2
    optuna_storage: str | None = None  # RDB URL of Optuna's studies (None: in memory)
    optuna_study: str = ""  # this Tuner's Optuna study name in that storage
    quiet: bool = True  # Ray Train's own INFO lines off (tune.py -v turns them on)
    spool_root: str | None = None  # where MLflow calls wait while the server is away (spool.DurableRun)
    tracking_wait_s: float = 300.0  # how long a trial waits for the server to create its run / send its journal

    def cell_of(self, config: dict[str, Any]) -> Cell:
        return self.cells[config[CELL_KEY]] if CELL_KEY in config else next(iter(self.cells.values()))


def trial_run_name(cell: Cell, config: dict[str, Any], trial_id: str) -> str:
    """A short MLflow run name that tells trials apart at a glance: the cell, what this trial sets, its id,
    e.g. `ETTh1-96 variant=w/o VAL seed=2022 #00003`."""
    def short(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = " ".join(f"{short_name(k)}={short(v)}" for k, v in config.items() if k != CELL_KEY)
    return " ".join(filter(None, [cell.label, values, f"#{trial_id.rsplit('_', 1)[-1]}"]))


def resolved_params(exp: ExperimentConfig, searched: dict[str, Any]) -> dict[str, Any]:
    """The trial's parameters as it really ran, each once: the resolved config without where it ran (n_vars,
    periodicity and the prompt's dataset description filled in), plus the variant name when the study has
    variants."""
    out = exp.params()
    if VARIANT_KEY in searched:
        out[VARIANT_KEY] = searched[VARIANT_KEY]
    return out


def trial_description(spec: StudySpec, cell: Cell, exp: ExperimentConfig, searched: dict[str, Any]) -> str:
    """The run's description (markdown, shown on its page): what this trial trains and what it changed."""
    m = exp.model
    target = f", tested on {cell.test_dataset}" if cell.test_dataset else ""
    how = {"grid": "a grid point"}.get(spec.searcher, "sampled by Optuna (TPE)") if spec.search else "fixed settings"
    sets = ", ".join(f"`{k}` = {v}" for k, v in searched.items()) or "nothing (the study's fixed settings)"
    return (f"Study **{spec.name}**, cell {cell.label}: {m.model} forecasts {cell.dataset}{target} "
            f"{m.pred_len} steps ahead from {m.seq_len}, {exp.train.epochs} epochs at most.\n\n"
            f"This trial sets {sets} ({how}).")


def train_driver(config: dict[str, Any], ctx: TrialContext) -> None:
    quiet_worker()
    tctx = ray.tune.get_context()
    trial_id = tctx.get_trial_id()
    spec = ctx.spec
    cell = ctx.cell_of(config)
    exp = spec.experiment(cell.dataset, cell.horizon, {k: v for k, v in config.items() if k != CELL_KEY},
                          cell.test_dataset)
    exp = exp.placed(dataclasses.replace(ctx.env, progress=False,
                                         num_threads=exp.train.num_threads or spec.resources.cpus_per_worker))
    client = MlflowClient(ctx.tracking_uri)
    searched = {k: v for k, v in config.items() if k != CELL_KEY}
    # A run needs the server to exist (its id is the server's): wait for it, then log through a journal
    run_id = tracking.wait_for("create trial run", ctx.tracking_wait_s, lambda: tracking.child_run(
        client, ctx.experiment_id, ctx.parent_run_id, trial_id, trial_run_name(cell, config, trial_id),
        {"dataset": cell.dataset, "test_dataset": cell.test_dataset or cell.dataset, "pred_len": str(cell.horizon),
         tracking.STUDY_TAG: spec.name, tracking.SEARCHED_TAG: json.dumps(searched, default=str),
         tracking.DESCRIPTION_TAG: trial_description(spec, cell, exp, searched),
         # where it ran (RunEnv), as tags: never parameters of what was trained
         "data_dir": exp.data.data_dir, "feature_cache": exp.train.cache_dir, "device": exp.train.device,
         "num_threads": str(exp.train.num_threads), **tracking.source_tags()}))
    run = DurableRun(client, run_id, ctx.spool_root) if run_id else None
    params = resolved_params(exp, searched)
    if run is not None:
        run.log_params(params)
    res = spec.resources
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"experiment": exp.to_dict(), "tracking_uri": ctx.tracking_uri, "run_id": run_id,
                           # a trial's end waits briefly for an away server; the study's end waits longer
                           "spool_root": ctx.spool_root, "flush_timeout_s": min(ctx.tracking_wait_s, 20.0),
                           # the trial's logged model carries its name and parameters
                           "model_name": trial_run_name(cell, config, trial_id), "model_params": params},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.workers_per_trial, use_gpu=res.gpus_per_worker > 0,
            resources_per_worker={"CPU": res.cpus_per_worker,
                                  **({"GPU": res.gpus_per_worker} if res.gpus_per_worker else {})}),
        run_config=ray.train.RunConfig(
            name=f"{ctx.run_name}-{trial_id}", storage_path=f"{ctx.storage_path}/train_runs",
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=ctx.worker_max_failures),
            # Train's controller and workers log every worker-group start, process group, checkpoint and
            # report at INFO (about ten lines per epoch per trial); the study prints one line per trial
            logging_config=ray.LoggingConfig(log_level="WARNING" if ctx.quiet else "INFO"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        if run is not None:
            study_results.fail_trial(run, f"{type(e).__name__}: {e}")
        raise
    reason = diverged_reason(result.checkpoint)
    if reason:
        if run is not None:
            study_results.fail_trial(run, f"diverged: {reason}")
        raise TrialDiverged(reason)
    if run is not None:
        run.terminate(True)
