"""Run a study: local or remote Ray, Tune experiments over the study's cells (one for all cells of a grid
study, so every trial competes for the cluster at once; one per cell for searched studies), MLflow parent
run, resume of an interrupted study, the final trials table and the cluster utilisation."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from timevlm.data.files import resolve_data_dir
from timevlm.data.windows import build_splits
from timevlm.model.vlm.base import feature_dims
from timevlm.errors import ConfigError
from timevlm_platform import cluster_checks, model_logging, spool, tracking
from timevlm_platform.console import PREFIX, TrialLines, quiet_driver, quiet_worker
from timevlm_platform.driver import TrialContext, train_driver
from timevlm_platform.search_space import num_samples, param_space, scheduler, searcher
from timevlm_platform.study import CELL_KEY, Cell, StudySpec

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


def platform_home() -> Path:
    """Where the embedded defaults live (mlruns/, ray_results/, feature_cache/): $TIMEVLM_HOME, else
    ~/timevlm-platform inside a `ray job submit` job (whose working dir is a temporary copy that Ray
    deletes), else the current directory."""
    if os.environ.get("TIMEVLM_HOME"):
        return Path(os.environ["TIMEVLM_HOME"]).expanduser().resolve()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return Path.home() / "timevlm-platform"
    return Path.cwd()


def _searched_values(spec: StudySpec, key: str) -> list | None:
    """The values a study searches for `key` (a choice or grid), or None when it does not search it."""
    return next((p.args.get("values") for p in spec.search if p.key == key), None)


def preflight(spec: StudySpec, data_dir: str) -> None:
    """Load every (dataset, horizon, seq_len) a study can ask for before any trial starts, so bad data
    fails in seconds with the file named, not in every trial after Ray Train retries."""
    seq_lens = _searched_values(spec, "model.seq_len")
    vlms = _searched_values(spec, "model.vlm")
    for cell in spec.cells():
        base = spec.experiment(cell.dataset, cell.horizon, {}, cell.test_dataset)
        for seq_len in seq_lens or [base.model.seq_len]:
            build_splits(dataclasses.replace(base.data, data_dir=data_dir), int(seq_len), cell.horizon)
    for vlm in vlms or [base.model.vlm]:
        cfg = dataclasses.replace(base.model, vlm=vlm)
        try:
            feature_dims(cfg)  # reads the variant's config only; fails fast when the weights are not there
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"VLM {vlm!r} is not available ({cfg.vlm_path or 'hub default'}): "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}. Put its weights in the "
                              f"Hugging Face cache or set model.vlm_path to a local copy") from None


def _cluster_concurrency(spec: StudySpec) -> int:
    res = spec.resources
    cluster_checks.check_trial_fits(spec.name, res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker,
                                    cluster_checks.alive_nodes())
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(res.workers_per_trial * res.cpus_per_worker, 1))
    limit = by_cpu
    if res.gpus_per_worker:
        limit = min(limit, int(total.get("GPU", 0) // (res.workers_per_trial * res.gpus_per_worker)))
    if limit < 1:
        raise ConfigError(f"study {spec.name}: the cluster ({total}) cannot fit one trial "
                          f"({res.workers_per_trial} workers x {res.cpus_per_worker} CPU, {res.gpus_per_worker} GPU)")
    return min(limit, res.max_concurrent) if res.max_concurrent else limit


def _node_inputs(spec: StudySpec, data_dir: str, cache_dir: str, opts: RunOptions):
    """What every node must have: the study's data files, a writable feature cache, the VLM variants' weights."""
    from timevlm.data.files import dataset_path
    from timevlm.data.registry import get_dataset

    paths = {}
    for name in sorted({d for c in spec.cells() for d in (c.dataset, c.test_dataset) if d}):
        try:
            paths[f"{name} data file"] = str(dataset_path(get_dataset(name), data_dir))
        except Exception:  # noqa: BLE001 - datasets of several files (M4) are checked by their loader
            paths[f"{name} data dir"] = data_dir
    base = spec.experiment(spec.cells()[0].dataset, spec.cells()[0].horizon, {}, spec.cells()[0].test_dataset)
    if opts.use_feature_cache and base.train.cache_fallback != "memory":
        paths["writable feature cache dir"] = cache_dir
    vlms = _searched_values(spec, "model.vlm") or [base.model.vlm]
    configs = [{"vlm": v, "vlm_path": base.model.vlm_path} for v in vlms] if base.model.model == "timevlm" else []
    return paths, configs


def trials_table(results: tune.ResultGrid, spec: StudySpec, cells: dict[str, Cell]) -> pd.DataFrame:
    zero_shot = any(c.test_dataset for c in cells.values())
    rows = []
    for r in results:
        m = r.metrics or {}
        cell = cells[r.config[CELL_KEY]] if CELL_KEY in (r.config or {}) else next(iter(cells.values()))
        status = "ERROR" if r.error else ("DONE" if "test_mse" in m else "STOPPED")
        row = {"dataset": cell.dataset, **({"test_dataset": cell.test_dataset} if zero_shot else {}),
               "horizon": cell.horizon,
               "trial": m.get("trial_id", r.path.rsplit("_", 2)[-2] if r.path else "?"), "status": status}
        row.update({key.split(".", 1)[-1]: r.config.get(key) for key in spec.searched_keys})
        if spec.seeds > 1:
            row["seed"] = r.config.get("train.seed")
        row.update({"epochs": m.get("epoch"), spec.metric: m.get(spec.metric),
                    "test_mse": m.get("test_mse"), "test_mae": m.get("test_mae")})
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:80]
        row["seconds"] = m.get("time_total_s", 0.0)
        rows.append(row)
    return pd.DataFrame(rows)


def utilisation(trial_seconds: float, slots: int, wall: float) -> float:
    """Share of the cluster's trial slots kept busy while the study's trials ran: slot-seconds the trials held
    over slots x the wall time of the trial phase (the up-front feature build and setup are reported beside)."""
    return trial_seconds / (slots * wall) if slots and wall > 0 else float("nan")


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
    return trials_table(tuner.fit(), spec, cells)


def _trial_busy_seconds(client: MlflowClient, experiment_id: str, parent_id: str, since: float) -> float:
    """How long trials held their slots in this invocation: each trial run's start to end in MLflow (the driver
    opens it first and closes it last, so Train's worker start and shutdown count; Tune's time_total_s stops
    at the last report). Runs finished before `since` (an earlier, resumed invocation) are not counted."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
                              max_results=10000)
    return sum((r.info.end_time - max(r.info.start_time, since * 1000)) / 1000 for r in runs
               if r.info.end_time and r.info.end_time >= since * 1000)


def _close_stopped(client: MlflowClient, experiment_id: str, parent_id: str, stopped: set[str],
                   scheduler: str = "ASHA") -> None:
    """Tune's verdict decides how a stopped trial's MLflow run ends. A trial the scheduler stopped early is a
    normal outcome, not an error: its run is FINISHED and its name and description say at which epoch it
    stopped. The run may still be RUNNING (its driver was ended before it could close the run), or FAILED: the
    driver's TorchTrainer can raise while Tune tears the trial down, and the driver then reports the teardown
    as a failure (seen in CI); both are corrected here. `stopped`: the trial ids Tune reports as STOPPED."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
                              max_results=10000)
    for run in runs:
        if run.data.tags.get(tracking.TRIAL_TAG) not in stopped or tracking.OUTCOME_TAG in run.data.tags:
            continue
        epoch = int(run.data.metrics.get("epoch", 0))
        outcome = f"stopped by {scheduler} at epoch {epoch}"
        note = run.data.tags.get(tracking.DESCRIPTION_TAG, "")

        def close(run=run, outcome=outcome, note=note) -> None:
            tracking.set_tags(client, run.info.run_id, {
                tracking.OUTCOME_TAG: outcome, "stopped_by": f"scheduler ({scheduler} early stop)",
                tracking.DESCRIPTION_TAG: f"{note}\n\n**{outcome.capitalize()}**: its validation loss was in the "
                                          f"worse part of the trials that reached that epoch."})
            if "failure_reason" in run.data.tags:  # the teardown's error, not the trial's
                client.delete_tag(run.info.run_id, "failure_reason")
            client.update_run(run.info.run_id, name=f"{run.info.run_name} [{outcome}]")
            client.set_terminated(run.info.run_id, "FINISHED")

        tracking.safe("close stopped trial", close)


def tracking_spool_root(storage: str, parent_run_id: str) -> str:
    """Where a study's MLflow calls wait while the server is away: beside its Ray results (shared storage on a
    cluster, so the driver can send what a worker node left), else a local temporary folder."""
    if "://" in storage:
        import tempfile

        return str(Path(tempfile.gettempdir()) / "timevlm-tracking-spool" / parent_run_id)
    return str(Path(storage) / "tracking_spool" / parent_run_id)


def _deliver_journals(client: MlflowClient, parent: str, root: str, timeout_s: float) -> dict[str, int]:
    """The end of the study: send what trials journaled while MLflow was away, and say how it went."""
    left = spool.flush_all(client, root, timeout_s)
    delayed, waiting = spool.delayed_counts(root)
    if delayed or waiting:
        how = ("all sent" if not waiting else
               f"{waiting} still waiting in {root} (MLflow did not answer for {timeout_s:.0f}s; runs "
               f"{', '.join(r[:8] for r in left)}; --resume sends them)")
        print(f"{PREFIX} MLflow: {delayed} call(s) were delayed while the tracking server was away; {how}",
              file=sys.stderr if waiting else sys.stdout, flush=True)
    tracking.safe("log tracking delivery", lambda: tracking.log_metrics(
        client, parent, tracking.system({"tracking_calls_delayed": delayed, "tracking_calls_waiting": waiting})))
    return {"delayed": delayed, "waiting": waiting}


def default_optuna_storage(tracking_uri: str, home: Path) -> str:
    """Optuna's studies in an SQLite file beside the embedded MLflow store (or in the platform's home when MLflow
    is a server), so `optuna-dashboard <url>` shows every searched study and --resume continues its sampler."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'optuna.db'}"
    return f"sqlite:///{home / 'optuna.db'}"


def searcher_kind(spec: StudySpec) -> str:
    return "optuna" if spec.searcher != "grid" and spec.search else "grid"


def forget_optuna_study(storage: str, name: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:  # no such study yet
        pass


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
    home = platform_home()
    data_dir = str(resolve_data_dir(opts.data_dir).resolve())
    preflight(spec, data_dir)
    tracking_uri = (opts.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
                    or tracking.default_tracking_uri(home))
    tracking.check_reachable(tracking_uri)
    cache_dir = opts.cache_dir or os.environ.get("TIMEVLM_CACHE_DIR") or str(home / "feature_cache")
    if "://" not in cache_dir:
        cache_dir = str(Path(cache_dir).resolve())
    storage = opts.storage_path or os.environ.get("TIMEVLM_STORAGE_PATH") or str(home / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).resolve())

    client = MlflowClient(tracking_uri)
    exp_name = opts.experiment_name or f"timevlm-{spec.name}"
    experiment_id = tracking.get_experiment_id(client, exp_name, tracking.default_artifact_root(tracking_uri))
    parent = tracking.parent_run(client, experiment_id, spec.name, opts.resume, {
        "study": spec.name, "searcher": spec.searcher, "trials": spec.trials, "epochs": spec.epochs,
        "datasets": ",".join(spec.datasets), "horizons": ",".join(map(str, spec.horizons)),
        "metric": spec.metric, "seed": spec.seed, "search": "; ".join(f"{p.key}~{p.kind}{p.args}" for p in spec.search),
        **{f"fixed.{s}.{k}": v for s, vals in spec.fixed.items() for k, v in vals.items()}},
        tags={tracking.DESCRIPTION_TAG: study_description(spec), **tracking.source_tags()})
    tracking.setup_experiment(client, experiment_id, study_description(spec), spec.metric, spec.searched_keys,
                              ascending=spec.mode == "min")
    optuna_storage = opts.optuna_storage or os.environ.get("TIMEVLM_OPTUNA_STORAGE") or default_optuna_storage(
        tracking_uri, home)
    spool_root = tracking_spool_root(storage, parent)

    # A trial stopped early by ASHA frees its Train workers asynchronously; the next trial's worker group
    # must be allowed to wait for them longer than Ray Train's default 60 s (inherited by a local cluster;
    # on a real cluster set it in the job's runtime env, see cluster/runtime_env.yaml).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    quiet_worker()  # before Ray starts: a local cluster's workers inherit these settings
    if not ray.is_initialized():
        # The local Ray starts with its dashboard: it serves the State API that Train V2's PlacementGroupCleaner
        # polls every second to see whether a trial's controller is alive. Without it every poll fails and
        # logs "Failed to query Ray Train Controller actor state" (about 100 lines per study), and a dead
        # controller's placement group would not be cleaned up.
        # Ray's own INFO lines (Train controllers announcing each worker group, Data's executor plans) come
        # from every worker process; WARNING keeps what needs a person's attention.
        ray.init(address=opts.address, include_dashboard=True if opts.address is None else None,
                 log_to_driver=True, logging_config=ray.LoggingConfig(log_level="WARNING"))
    quiet_driver(opts.verbose)
    concurrency = _cluster_concurrency(spec)
    cluster_checks.check_nodes_have_inputs(spec.name, *_node_inputs(spec, data_dir, cache_dir, opts),
                                           cluster_checks.alive_nodes())
    built = None
    if opts.use_feature_cache and opts.prebuild:
        from timevlm_platform.prebuild import prebuild_features

        try:
            built = prebuild_features(spec, data_dir, cache_dir, progress=opts.verbose > 0)
        except Exception as e:  # noqa: BLE001 - the trials can still build what they need themselves
            print(f"[timevlm-platform] WARNING: the up-front feature build failed ({type(e).__name__}: {e}); "
                  f"each trial builds the features it misses instead", file=sys.stderr, flush=True)
        else:
            print(f"[timevlm-platform] features: {built.line()}", flush=True)
            tracking.safe("log prebuild", lambda: tracking.log_metrics(client, parent, tracking.system({
                "features_needed": built.needed, "features_cached": built.present, "features_built": built.built,
                "features_build_seconds": built.seconds, "features_build_nodes": len(built.nodes)})))
    print(f"[timevlm-platform] study {spec.name}: {len(spec.cells())} cell(s) x "
          f"{'grid' if spec.searcher == 'grid' else spec.trials} trials, {spec.epochs} epochs, "
          f"{concurrency} concurrent; MLflow {tracking_uri} (experiment {exp_name}, parent run {parent})",
          flush=True)

    groups = []
    for run_name, group in spec.tuner_groups():
        path = f"{storage}/{run_name}"
        exists = tune.Tuner.can_restore(path)
        if exists and not opts.resume and not opts.fresh:
            raise ConfigError(f"study {spec.name}: {run_name} already has results at {path}; pass --resume to "
                              f"continue it or --fresh to start it over")
        if exists and not opts.resume:
            shutil.rmtree(path, ignore_errors=True)
        optuna_study = f"{exp_name}/{run_name}"
        if not (exists and opts.resume) and searcher_kind(spec) == "optuna":
            forget_optuna_study(optuna_storage, optuna_study)  # a fresh run's sampler starts from nothing
        ctx = TrialContext(spec, {c.label: c for c in group}, run_name, storage, tracking_uri, experiment_id,
                           parent, data_dir, cache_dir, opts.use_feature_cache, opts.worker_max_failures,
                           optuna_storage=optuna_storage, optuna_study=optuna_study, quiet=opts.verbose < 2,
                           spool_root=spool_root, tracking_wait_s=opts.tracking_wait_s)
        groups.append((ctx, exists and opts.resume))

    t_trials, t_fit = time.time(), time.perf_counter()
    if len(groups) == 1:
        tables = [_fit_group(groups[0][0], groups[0][1], concurrency, opts.verbose)]
    else:
        # One Tuner per cell (searched or ASHA studies): run them side by side, each from a task on this node
        # (its results go to the same storage), so their trials compete for the cluster's slots together.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        fit = ray.remote(num_cpus=0, scheduling_strategy=here)(_fit_group)
        tables = ray.get([fit.remote(ctx, resume, concurrency, opts.verbose) for ctx, resume in groups])
    trials_wall = time.perf_counter() - t_fit
    delivery = _deliver_journals(client, parent, spool_root, opts.tracking_wait_s)
    stopped = {t for table in tables for t in table.loc[table["status"] == "STOPPED", "trial"]}
    _close_stopped(client, experiment_id, parent, stopped, spec.scheduler.type.upper())
    bests, registered = {}, []
    for (ctx, _), table in zip(groups, tables):
        cells = ctx.cells
        for label, cell in cells.items():
            ok = table[(table["dataset"] == cell.dataset) & (table["horizon"] == cell.horizon)]
            if cell.test_dataset:
                ok = ok[ok["test_dataset"] == cell.test_dataset]
            ok = ok.dropna(subset=[spec.metric])
            if len(ok):
                best = ok.sort_values(spec.metric, ascending=spec.mode == "min").iloc[0]
                bests[label] = best
                name = _tag_best(client, tracking_uri, experiment_id, parent, spec, cell, best,
                                 many_cells=len(spec.cells()) > 1)
                registered += [name] if name else []
    _log_study_metrics(client, parent, spec, bests)

    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    wall = time.perf_counter() - t_start
    busy = _trial_busy_seconds(client, experiment_id, parent, since=t_trials)
    usage = {"cluster_utilisation": utilisation(busy, concurrency, trials_wall), "trial_slots": concurrency,
             "trial_seconds_sum": busy, "trials_wall_seconds": trials_wall, "study_wall_seconds": wall}
    print(f"[timevlm-platform] study {spec.name}: {wall:.0f}s wall ({trials_wall:.0f}s of it running trials); "
          f"trials busy {busy:.0f}s in {concurrency} slot(s): cluster utilisation "
          f"{usage['cluster_utilisation']:.2f}", flush=True)
    _finish_parent(client, parent, table, usage)
    return {"table": table, "best": bests, "parent_run_id": parent, "experiment_id": experiment_id,
            "tracking_uri": tracking_uri, "wall_seconds": wall, "storage": storage, "usage": usage,
            "prebuild": built, "log_failures": tracking.LogFailures.count, "optuna_storage": optuna_storage,
            "tracking_delivery": delivery,
            "registered": registered}


def _metric_values(best, keys) -> dict[str, float]:
    return {k: float(best[k]) for k in keys
            if best.get(k) is not None and not (isinstance(best[k], float) and math.isnan(best[k]))}


BEST_MARK = " [best]"


def _tag_best(client, tracking_uri, experiment_id, parent, spec, cell, best, many_cells: bool) -> str | None:
    """Mark a cell's best trial (by validation), register its model, and note it on the study's run; returns the
    registered model's name."""
    registered = None
    run = tracking.find_run(client, experiment_id, **{tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: best["trial"]})
    prefix = f"best.{cell.label.replace('-', '.')}"
    tags = {f"{prefix}.trial": best["trial"], f"{prefix}.{spec.metric}": best[spec.metric]}
    tags.update({f"{prefix}.{key}": best[key.split('.', 1)[-1]] for key in spec.searched_keys})
    metrics = _metric_values(best, (spec.metric, "test_mse", "test_mae"))
    if run is not None:
        tags[f"{prefix}.run_id"] = run.info.run_id
        def mark() -> None:  # the best trial says so in its name, which the runs table shows first
            tracking.set_tags(client, run.info.run_id, {tracking.BEST_TAG: "true"})
            if not run.info.run_name.endswith(BEST_MARK):
                client.update_run(run.info.run_id, name=f"{run.info.run_name}{BEST_MARK}")

        tracking.safe("tag best trial", mark)
        model_uri = run.data.tags.get(tracking.MODEL_URI_TAG)
        if model_uri:
            name = model_logging.registered_name(spec.name, cell.label)
            version = tracking.safe("register best model", lambda: model_logging.register_best(
                client, tracking_uri, name, model_uri, run.info.run_id,
                {**metrics, "trial": best["trial"], "study": spec.name, "cell": cell.label,
                 **{k: best[k.split('.', 1)[-1]] for k in spec.searched_keys}},
                f"Best trial of study {spec.name} on {cell.label}, chosen on validation {spec.metric}."))
            if version:
                registered = name
                tags[f"{prefix}.registered_model"] = f"{name}/{version}"
                print(f"{PREFIX} registered {name} version {version} (alias @best): trial {best['trial']}, "
                      f"model {model_uri}", flush=True)
    tracking.safe("tag study best", lambda: tracking.set_tags(client, parent, tags))
    if many_cells:  # the cell's own figures, grouped under its label in MLflow's charts
        tracking.safe("log cell best", lambda: tracking.log_metrics(
            client, parent, {f"{cell.label}/{k}": v for k, v in metrics.items()}))
    return registered


def _log_study_metrics(client, parent, spec, bests: dict) -> None:
    """The study's result on its run: the best trials' values, averaged over cells when there are several (the
    paper's "average over horizons" rows), as `study/<metric>`: under the trials' own names the study's row
    would tie with its best trial when the runs are sorted or charted by them."""
    per_cell = [_metric_values(b, (spec.metric, "test_mse", "test_mae")) for b in bests.values()]
    keys = set().union(*per_cell) if per_cell else set()
    means = {f"study/{k}": float(np.mean([m[k] for m in per_cell if k in m])) for k in keys}
    tracking.safe("log study best", lambda: tracking.log_metrics(client, parent, means))


def _finish_parent(client, parent, table: pd.DataFrame, usage: dict[str, float]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "trials.csv"
        table.to_csv(p, index=False)
        tracking.safe("log trials table", lambda: client.log_artifact(parent, str(p)))
    tracking.safe("log study usage", lambda: tracking.log_metrics(client, parent, tracking.system(usage)))
    failed = int((table.get("status") == "ERROR").sum()) if len(table) else 0
    tracking.safe("finish study run", lambda: tracking.finish(client, parent, True))
    if failed:
        print(f"[timevlm-platform] {failed} trial(s) failed; see the table and their MLflow runs", file=sys.stderr)
