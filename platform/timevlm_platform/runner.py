"""Run a study: its paths resolved, its MLflow run opened, Ray started, the cluster checked, the VLM features built
up front, then the Tune experiments over its cells (one for all cells of a grid study, so every trial competes
for the cluster at once; one per cell for searched studies; `--resume` continues them), and its outcome
recorded (study_results)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from timevlm.config import RunEnv
from timevlm.errors import ConfigError
from timevlm_platform import cluster_checks, faults, settings, spool, study_results, tracking
from timevlm_platform.console import TrialLines, quiet_driver, quiet_worker
from timevlm_platform.driver import TrialContext, train_driver
from timevlm_platform.search_space import (forget_optuna_study, num_samples, param_space, scheduler, searcher,
                                           searcher_kind, tuner_groups)
from timevlm_platform.settings import StudyPaths, resolve_paths
from timevlm_platform.study import CELL_KEY, StudySpec

DRIVER_MEMORY_BYTES = 256 * 1024**2


@dataclass
class RunOptions:
    resume: bool = False
    fresh: bool = False
    tracking_uri: str | None = None
    address: str | None = None
    storage_path: str | None = None  # Ray Tune/Train results (shared storage on a multi-node cluster)
    data_dir: str | None = None
    cache_dir: str | None = None
    use_feature_cache: bool = True
    prebuild: bool = True  # build the study's VLM features as one distributed batch job before the trials
    experiment_name: str | None = None
    verbose: int = 1
    worker_max_failures: int = 2
    optuna_storage: str | None = None  # Optuna RDB URL (default: optuna.db beside the MLflow store)
    tracking_wait_s: float = 300.0  # how long to wait for an away MLflow server before giving up on a call


def _fit_group(ctx: TrialContext, resume: bool, concurrency: int, verbose: int) -> pd.DataFrame:
    """Run (or resume) the Tune experiment of one group of cells and return its trials table."""
    spec, cells = ctx.spec, ctx.cells
    path = f"{ctx.storage_path}/{ctx.run_name}"
    # The driver only waits on its TorchTrainer; it takes no CPU (the workers do) but some memory.
    trainable = tune.with_resources(tune.with_parameters(train_driver, ctx=ctx),
                                    {"cpu": 0, "memory": DRIVER_MEMORY_BYTES})
    # Tune registers a trainable under its name for the whole Ray job; Tuners running side by side must not
    # share one, or every Tuner's trials run the last-registered context (seen: both cells trained cell 2).
    trainable.__name__ = "trial_" + re.sub(r"\W", "_", ctx.run_name)
    if resume:
        print(f"[timevlm-platform] resuming {ctx.run_name} from {path}", flush=True)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
    else:
        space = param_space(spec)
        if len(cells) > 1:  # every cell's trials in this one Tuner: they share the cluster's slots
            space[CELL_KEY] = tune.grid_search(list(cells))
        tuner = tune.Tuner(
            trainable, param_space=space,
            # reuse_actors: a finished trial's driver process takes the next trial, so a slot does not sit
            # idle while a new process starts and imports torch and mlflow (~6 s per trial, measured). Not
            # with a scheduler that stops trials: a stopped trial's driver stays blocked in its TorchTrainer,
            # Tune's reset of that process times out, and the trial meant to reuse it fails ("Trainable runner
            # reuse requires reset_config() to be implemented and return True"; seen with ASHA)
            tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode,
                                        search_alg=searcher(spec, ctx.optuna_storage, ctx.optuna_study),
                                        scheduler=scheduler(spec), num_samples=num_samples(spec),
                                        max_concurrent_trials=concurrency,
                                        reuse_actors=spec.scheduler.type == "fifo"),
            # Tune's own console (status tables every 30 s, each trial's config and results as boxes) is replaced
            # by one line per finished trial; verbose=2 keeps Tune's output too
            run_config=tune.RunConfig(name=ctx.run_name, storage_path=ctx.storage_path,
                                      verbose=0 if verbose < 2 else 2,
                                      callbacks=[TrialLines(ctx)] if verbose else [],
                                      failure_config=tune.FailureConfig(max_failures=0)))
    return study_results.trials_table(tuner.fit(), spec, cells)


def study_description(spec: StudySpec) -> str:
    cells = ", ".join(c.label for c in spec.cells())
    how = (f"{spec.trials} trials per cell sampled by Optuna (TPE)" if searcher_kind(spec) == "optuna"
           else "a grid" + (f" over {', '.join(spec.searched_keys)}" if spec.searched_keys else ""))
    seeds = f", {spec.seeds} seeds each" if spec.seeds > 1 else ""
    return (f"{spec.description or spec.name}\n\nCells: {cells}. Search: {how}{seeds}; at most {spec.epochs} epochs "
            f"per trial; trials are compared on validation `{spec.metric}` only. This run's metrics are those of "
            f"each cell's best trial (averaged over cells when there are several).")


def run_study(spec: StudySpec, opts: RunOptions) -> dict[str, Any]:
    t_start = time.perf_counter()
    paths = resolve_paths(opts.data_dir, opts.tracking_uri, opts.cache_dir, opts.storage_path, opts.optuna_storage)
    skipped = cluster_checks.preflight(spec, paths.data_dir)
    if skipped:
        spec = spec.without_values("model.vlm", list(skipped))
        print(f"[timevlm-platform] skipping VLM(s) {', '.join(skipped)} (unavailable_vlms: skip; the study's run "
              f"and report say why): {next(iter(skipped.values()))}", file=sys.stderr, flush=True)
    tracking.check_reachable(paths.tracking_uri)
    client = MlflowClient(paths.tracking_uri)
    exp_name = opts.experiment_name or f"timevlm-{spec.name}"
    experiment_id, parent = _open_study_run(client, spec, exp_name, paths.tracking_uri, opts.resume, skipped)
    spool_root = settings.spool_root(paths.storage, parent)
    # the study's own run: its calls are journaled beside its trials' while MLflow is away (all its state is on disk)
    study = spool.DurableRun(client, parent, spool_root, count_delays=False)
    _start_ray(opts)
    concurrency = cluster_checks.cluster_concurrency(spec)
    cluster_checks.check_nodes_have_inputs(spec.name, *cluster_checks.node_inputs(
        spec, paths.data_dir, paths.cache_dir, opts.use_feature_cache), cluster_checks.alive_nodes())
    built = _prebuild(spec, opts, paths, study)
    print(f"[timevlm-platform] study {spec.name}: {len(spec.cells())} cell(s) x "
          f"{'grid' if spec.searcher == 'grid' else spec.trials} trials, {spec.epochs} epochs, "
          f"{concurrency} concurrent; MLflow {paths.tracking_uri} (experiment {exp_name}, parent run {parent})",
          flush=True)
    groups = [(TrialContext(spec, {c.label: c for c in group}, run_name, paths.storage, paths.tracking_uri,
                            experiment_id, parent, RunEnv(data_dir=paths.data_dir, cache_dir=paths.cache_dir,
                                                          use_feature_cache=opts.use_feature_cache),
                            opts.worker_max_failures, optuna_storage=paths.optuna_storage,
                            optuna_study=f"{exp_name}/{run_name}", quiet=opts.verbose < 2, spool_root=spool_root,
                            tracking_wait_s=opts.tracking_wait_s), _resumes(spec, opts, paths, exp_name, run_name))
              for run_name, group in tuner_groups(spec)]

    t_trials, t_fit = time.time(), time.perf_counter()
    tables = _fit_groups(groups, concurrency, opts.verbose)
    trials_wall = time.perf_counter() - t_fit
    # what trials kept while MLflow was away is sent first (the study's outcome reads their runs); the study's
    # outcome then goes to its run through the same kind of journal: an outage from here on delays it, no more
    deadline = time.monotonic() + opts.tracking_wait_s
    spool.flush_all(client, spool_root, opts.tracking_wait_s, last=parent)
    faults.pause("study_end")
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    stopped = {t for t in table.loc[table["status"] == "STOPPED", "trial"]} if len(table) else set()
    study_results.close_stopped(study, experiment_id, stopped, spec.scheduler.type.upper())
    cells = {label: cell for ctx, _ in groups for label, cell in ctx.cells.items()}
    bests, registered = study_results.record_bests(study, paths.tracking_uri, experiment_id, spec, cells, table)
    study_results.log_selection_gap(study, spec, table)
    wall = time.perf_counter() - t_start
    busy = study_results.trial_busy_seconds(client, experiment_id, parent, t_trials, table,
                                            until=t_trials + trials_wall)
    usage = {"cluster_utilisation": study_results.utilisation(busy, concurrency, trials_wall),
             "trial_slots": concurrency, "trial_seconds_sum": busy, "trials_wall_seconds": trials_wall,
             "study_wall_seconds": wall}
    print(f"[timevlm-platform] study {spec.name}: {wall:.0f}s wall ({trials_wall:.0f}s of it running trials); "
          f"trials busy {busy:.0f}s in {concurrency} slot(s): cluster utilisation "
          f"{usage['cluster_utilisation']:.2f}", flush=True)
    study_results.finish_parent(study, table, usage)
    delivery = study_results.deliver_journals(study, max(30.0, deadline - time.monotonic()))
    if delivery["waiting"]:  # a registration still in the journal cannot be loaded yet: not announced
        registered = []
    return {"table": table, "best": bests, "parent_run_id": parent, "experiment_id": experiment_id,
            "tracking_uri": paths.tracking_uri, "wall_seconds": wall, "storage": paths.storage, "usage": usage,
            "prebuild": built, "log_failures": tracking.LogFailures.count, "optuna_storage": paths.optuna_storage,
            "tracking_delivery": delivery, "registered": registered}


def _open_study_run(client: MlflowClient, spec: StudySpec, exp_name: str, tracking_uri: str,
                    resume: bool, skipped: dict[str, str]) -> tuple[str, str]:
    """The study's experiment (its default view set up) and its parent run, reused on --resume; the run names
    the VLMs skipped here and why (its report lists them as not run)."""
    experiment_id = tracking.get_experiment_id(client, exp_name, tracking.default_artifact_root(tracking_uri))
    parent = tracking.parent_run(client, experiment_id, spec.name, resume, {
        "study": spec.name, "searcher": spec.searcher, "trials": spec.trials, "epochs": spec.epochs,
        "datasets": ",".join(spec.datasets), "horizons": ",".join(map(str, spec.horizons)),
        "metric": spec.metric, "seed": spec.seed, "search": "; ".join(f"{p.key}~{p.kind}{p.args}" for p in spec.search),
        **{f"fixed.{s}.{k}": v for s, vals in spec.fixed.items() for k, v in vals.items()}},
        tags={tracking.DESCRIPTION_TAG: study_description(spec), **tracking.source_tags(),
              **({tracking.SKIPPED_TAG: json.dumps(skipped)} if skipped else {})})
    tracking.setup_experiment(client, experiment_id, study_description(spec), spec.metric, spec.searched_keys,
                              ascending=spec.mode == "min")
    return experiment_id, parent


def _start_ray(opts: RunOptions) -> None:
    # A trial stopped early by ASHA frees its Train workers asynchronously; the next trial's worker group
    # must be allowed to wait for them longer than Ray Train's default 60 s (inherited by a local cluster;
    # on a real cluster set it in the job's runtime env, see cluster/runtime_env.yaml).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    if opts.address is None and not ray.is_initialized():
        # A local cluster is this one machine: no node can be preempted, so Train V2's PreemptionWatcher (one
        # more actor per trial, whose start Ray's core worker logs at ERROR, ray-project/ray#57733) has nothing
        # to watch. A real cluster keeps it (its runtime env decides).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    quiet_worker()  # before Ray starts: a local cluster's workers inherit these settings
    if not ray.is_initialized():
        # Ray's own INFO lines (Train controllers announcing each worker group, Data's executor plans) come
        # from every worker process; WARNING keeps what needs a person's attention.
        logging_config = ray.LoggingConfig(log_level="WARNING")
        if opts.address is None and not os.environ.get("RAY_ADDRESS"):
            ray.init(**_own_local_cluster(), log_to_driver=True, logging_config=logging_config)
        else:  # a cluster joined deliberately: --address, or the job's RAY_ADDRESS under `ray job submit`
            ray.init(address=opts.address, log_to_driver=True, logging_config=logging_config)
    quiet_driver(opts.verbose)


def _own_local_cluster() -> dict[str, Any]:
    """ray.init's arguments for a study's own local Ray, apart from any other on the machine (another study's,
    a `ray start` one: two studies at once must not meet).

    It starts with its dashboard, which serves the State API that Train V2's PlacementGroupCleaner polls every
    second to see whether a trial's controller is alive (without it every poll fails and logs "Failed to query
    Ray Train Controller actor state", and a dead controller's placement group is not cleaned up). Those polls
    find the State API by looking for a Ray on the machine; with two there they fail with "Found multiple active
    Ray instances" and the trial with them. So the dashboard gets a port chosen here, and RAY_API_SERVER_ADDRESS
    names it before Ray starts: every process of this cluster inherits it and asks its own dashboard."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
    return {"address": "local", "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port}


def _prebuild(spec: StudySpec, opts: RunOptions, paths: StudyPaths, study: spool.DurableRun):
    """The study's VLM features as one distributed batch job before the trials (None when off or failed)."""
    if not (opts.use_feature_cache and opts.prebuild):
        return None
    from timevlm_platform.prebuild import prebuild_features

    try:
        built = prebuild_features(spec, paths.data_dir, paths.cache_dir, progress=opts.verbose > 0)
    except Exception as e:  # noqa: BLE001 - the trials can still build what they need themselves
        print(f"[timevlm-platform] WARNING: the up-front feature build failed ({type(e).__name__}: {e}); "
              f"each trial builds the features it misses instead", file=sys.stderr, flush=True)
        return None
    print(f"[timevlm-platform] features: {built.line()}", flush=True)
    study.log_metrics(tracking.system({
        "features_needed": built.needed, "features_cached": built.present, "features_built": built.built,
        "features_build_seconds": built.seconds, "features_build_nodes": len(built.nodes)}))
    return built


def _resumes(spec: StudySpec, opts: RunOptions, paths: StudyPaths, exp_name: str, run_name: str) -> bool:
    """Whether a Tune experiment continues from its stored results (--resume), after clearing what --fresh
    starts over; a study that has results is refused without either."""
    path = f"{paths.storage}/{run_name}"
    exists = tune.Tuner.can_restore(path)
    if exists and not opts.resume and not opts.fresh:
        raise ConfigError(f"study {spec.name}: {run_name} already has results at {path}; pass --resume to "
                          f"continue it or --fresh to start it over")
    if exists and not opts.resume:
        shutil.rmtree(path, ignore_errors=True)
    if not (exists and opts.resume) and searcher_kind(spec) == "optuna":
        forget_optuna_study(paths.optuna_storage, f"{exp_name}/{run_name}")  # a fresh sampler starts from nothing
    return exists and opts.resume


def _fit_groups(groups: list[tuple[TrialContext, bool]], concurrency: int, verbose: int) -> list[pd.DataFrame]:
    if len(groups) == 1:
        return [_fit_group(groups[0][0], groups[0][1], concurrency, verbose)]
    # One Tuner per cell (searched or ASHA studies): run them side by side, each from a task on this node
    # (its results go to the same storage), so their trials compete for the cluster's slots together.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    fit = ray.remote(num_cpus=0, scheduling_strategy=here)(_fit_group)
    return ray.get([fit.remote(ctx, resume, concurrency, verbose) for ctx, resume in groups])
