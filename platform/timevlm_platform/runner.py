"""Run a study: local or remote Ray, one Tune experiment per (dataset, horizon) cell, MLflow parent run,
resume of an interrupted study, and the final trials table."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from mlflow.tracking import MlflowClient
from ray import tune

from timevlm.data.files import resolve_data_dir
from timevlm.data.windows import build_splits
from timevlm.model.vlm.base import feature_dims
from timevlm.errors import ConfigError
from timevlm_platform import tracking
from timevlm_platform.driver import TrialContext, train_driver
from timevlm_platform.search_space import num_samples, param_space, scheduler, searcher
from timevlm_platform.study import StudySpec

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
    experiment_name: str | None = None
    verbose: int = 1
    worker_max_failures: int = 2


def platform_home() -> Path:
    """Where the embedded defaults live (mlruns/, ray_results/, feature_cache/): $TIMEVLM_HOME, else
    ~/timevlm-platform inside a `ray job submit` job (whose working dir is a temporary copy that Ray
    deletes), else the current directory."""
    if os.environ.get("TIMEVLM_HOME"):
        return Path(os.environ["TIMEVLM_HOME"]).expanduser().resolve()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return Path.home() / "timevlm-platform"
    return Path.cwd()


def preflight(spec: StudySpec, data_dir: str) -> None:
    """Load every (dataset, horizon, seq_len) a study can ask for before any trial starts, so bad data
    fails in seconds with the file named, not in every trial after Ray Train retries."""
    seq_lens = next((p.args.get("values") for p in spec.search if p.key == "model.seq_len"), None)
    vlms = next((p.args.get("values") for p in spec.search if p.key == "model.vlm"), None)
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
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(res.workers_per_trial * res.cpus_per_worker, 1))
    limit = by_cpu
    if res.gpus_per_worker:
        limit = min(limit, int(total.get("GPU", 0) // (res.workers_per_trial * res.gpus_per_worker)))
    if limit < 1:
        raise ConfigError(f"study {spec.name}: the cluster ({total}) cannot fit one trial "
                          f"({res.workers_per_trial} workers x {res.cpus_per_worker} CPU, {res.gpus_per_worker} GPU)")
    return min(limit, res.max_concurrent) if res.max_concurrent else limit


def trials_table(results: tune.ResultGrid, spec: StudySpec) -> pd.DataFrame:
    rows = []
    for r in results:
        m = r.metrics or {}
        status = "ERROR" if r.error else ("DONE" if "test_mse" in m else "STOPPED")
        row = {"trial": m.get("trial_id", r.path.rsplit("_", 2)[-2] if r.path else "?"), "status": status}
        row.update({key.split(".", 1)[-1]: r.config.get(key) for key in spec.searched_keys})
        if spec.seeds > 1:
            row["seed"] = r.config.get("train.seed")
        row.update({"epochs": m.get("epoch"), spec.metric: m.get(spec.metric),
                    "test_mse": m.get("test_mse"), "test_mae": m.get("test_mae")})
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:80]
        rows.append(row)
    return pd.DataFrame(rows)


def _close_orphans(client: MlflowClient, experiment_id: str, parent_id: str) -> None:
    """Child runs still RUNNING after the cell ended were stopped by the scheduler: say so in MLflow."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}' "
                                                             f"and attributes.status = 'RUNNING'")
    for run in runs:
        tracking.safe("close stopped trial", lambda: (
            tracking.set_tags(client, run.info.run_id, {"stopped_by": "scheduler (ASHA early stop)"}),
            client.set_terminated(run.info.run_id, "KILLED")))


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
        **{f"fixed.{s}.{k}": v for s, vals in spec.fixed.items() for k, v in vals.items()}})

    # A trial stopped early by ASHA frees its Train workers asynchronously; the next trial's worker group
    # must be allowed to wait for them longer than Ray Train's default 60 s (inherited by a local cluster;
    # on a real cluster set it in the job's runtime env, see cluster/runtime_env.yaml).
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "900")
    if not ray.is_initialized():
        ray.init(address=opts.address, include_dashboard=False if opts.address is None else None,
                 log_to_driver=True)
    concurrency = _cluster_concurrency(spec)
    print(f"[timevlm-platform] study {spec.name}: {len(spec.cells())} cell(s) x "
          f"{'grid' if spec.searcher == 'grid' else spec.trials} trials, {spec.epochs} epochs, "
          f"{concurrency} concurrent; MLflow {tracking_uri} (experiment {exp_name}, parent run {parent})",
          flush=True)

    tables, bests = [], {}
    for cell in spec.cells():
        run_name = f"{spec.name}-{cell.label}"
        path = f"{storage}/{run_name}"
        ctx = TrialContext(spec, cell, run_name, storage, tracking_uri, experiment_id, parent,
                           data_dir, cache_dir, opts.use_feature_cache, opts.worker_max_failures)
        # The driver only waits on its TorchTrainer; it takes no CPU (the workers do) but some memory.
        trainable = tune.with_resources(tune.with_parameters(train_driver, ctx=ctx),
                                        {"cpu": 0, "memory": DRIVER_MEMORY_BYTES})
        exists = tune.Tuner.can_restore(path)
        if exists and opts.resume:
            print(f"[timevlm-platform] resuming {run_name} from {path}", flush=True)
            tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False)
        else:
            if exists and not opts.fresh:
                raise ConfigError(f"study cell {run_name} already has results at {path}; pass --resume to "
                                  f"continue it or --fresh to start it over")
            if exists:
                shutil.rmtree(path, ignore_errors=True)
            tuner = tune.Tuner(
                trainable, param_space=param_space(spec),
                tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.mode, search_alg=searcher(spec),
                                            scheduler=scheduler(spec), num_samples=num_samples(spec),
                                            max_concurrent_trials=concurrency),
                run_config=tune.RunConfig(name=run_name, storage_path=storage, verbose=opts.verbose,
                                          failure_config=tune.FailureConfig(max_failures=0)))
        results = tuner.fit()
        _close_orphans(client, experiment_id, parent)
        table = trials_table(results, spec)
        table.insert(0, "horizon", cell.horizon)
        if cell.test_dataset:
            table.insert(0, "test_dataset", cell.test_dataset)
        table.insert(0, "dataset", cell.dataset)
        tables.append(table)
        ok = table.dropna(subset=[spec.metric])
        if len(ok):
            best = ok.sort_values(spec.metric, ascending=spec.mode == "min").iloc[0]
            bests[cell.label] = best
            _tag_best(client, experiment_id, parent, spec, cell, best)

    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    wall = time.perf_counter() - t_start
    _finish_parent(client, parent, table, wall)
    return {"table": table, "best": bests, "parent_run_id": parent, "experiment_id": experiment_id,
            "tracking_uri": tracking_uri, "wall_seconds": wall, "storage": storage,
            "log_failures": tracking.LogFailures.count}


def _tag_best(client, experiment_id, parent, spec, cell, best) -> None:
    run = tracking.find_run(client, experiment_id, **{tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: best["trial"]})
    prefix = f"best.{cell.label.replace('-', '.')}"
    tags = {f"{prefix}.trial": best["trial"], f"{prefix}.{spec.metric}": best[spec.metric]}
    tags.update({f"{prefix}.{key}": best[key.split('.', 1)[-1]] for key in spec.searched_keys})
    if run is not None:
        tags[f"{prefix}.run_id"] = run.info.run_id
        tracking.safe("tag best trial", lambda: tracking.set_tags(client, run.info.run_id, {tracking.BEST_TAG: "true"}))
    tracking.safe("tag study best", lambda: tracking.set_tags(client, parent, tags))
    metrics = {f"best_{cell.label.replace('-', '_')}_{k}": best[k] for k in (spec.metric, "test_mse", "test_mae")
               if best.get(k) is not None and not (isinstance(best[k], float) and math.isnan(best[k]))}
    tracking.safe("log study best", lambda: tracking.log_metrics(client, parent, metrics))


def _finish_parent(client, parent, table: pd.DataFrame, wall: float) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "trials.csv"
        table.to_csv(p, index=False)
        tracking.safe("log trials table", lambda: client.log_artifact(parent, str(p)))
    tracking.safe("log study wall time", lambda: tracking.log_metrics(client, parent, {"study_wall_seconds": wall}))
    failed = int((table.get("status") == "ERROR").sum()) if len(table) else 0
    tracking.safe("finish study run", lambda: tracking.finish(client, parent, True))
    if failed:
        print(f"[timevlm-platform] {failed} trial(s) failed; see the table and their MLflow runs", file=sys.stderr)
