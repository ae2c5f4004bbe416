"""MLflow: embedded default store, reachability check, one parent run per study, one child run per trial.

What a run logs goes through `spool.DurableRun` (the trials' runs and the study's alike): a call that fails
after `backoff` is kept in a journal on disk and sent when the server answers, never dropped and never
allowed to kill a trial. Creating a run cannot be journaled (its id is the server's): `wait_for` waits.
"""
from __future__ import annotations

import contextlib
import functools
import getpass
import importlib.metadata
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

from filelock import FileLock
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from timevlm.errors import ConfigError

T = TypeVar("T")
PARENT_TAG = "mlflow.parentRunId"
ROLE_TAG = "timevlm.role"
STUDY_TAG = "timevlm.study"
TRIAL_TAG = "timevlm.trial_id"
BEST_TAG = "timevlm.best_trial"
MODEL_URI_TAG = "timevlm.model_uri"
SEARCHED_TAG = "timevlm.searched"  # JSON of what the sampler/grid set for this trial (the params hold each once)
OUTCOME_TAG = "timevlm.outcome"
SKIPPED_TAG = "timevlm.skipped_vlms"  # JSON {vlm: why}: searched VLMs a study could not run where it ran
DESCRIPTION_TAG = "mlflow.note.content"  # MLflow's run/experiment description
VIEW_KEY = "timevlm"  # ?viewStateShareKey=timevlm opens the experiment's runs with the study's columns


@functools.cache
def _git_commit() -> str | None:
    """The commit of the checkout the platform runs from (None in a copy without .git, e.g. a Ray job's
    working_dir; set TIMEVLM_GIT_COMMIT there)."""
    if os.environ.get("TIMEVLM_GIT_COMMIT"):
        return os.environ["TIMEVLM_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                             capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """MLflow's source columns: what ran (the entry point), as which user, at which commit."""
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": Path(sys.argv[0]).name or "python",
            "mlflow.user": getpass.getuser(), "timevlm.version": _version()}
    if commit := _git_commit():
        tags["mlflow.source.git.commit"] = commit
    return tags


def _version() -> str:
    try:
        return importlib.metadata.version("timevlm-platform")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def setup_experiment(client: MlflowClient, experiment_id: str, description: str, metric: str,
                     searched: list[str], ascending: bool = True) -> None:
    """Make the experiment open as what it is: a model-training experiment (MLflow 3 otherwise opens an empty
    GenAI overview), described, with a shared view whose runs table shows the columns a study is read by, sorted
    by the validation metric, best first, and whose chart view opens on the search (`chart_view`). Sorted by a
    metric the UI lists runs flat (not nested under the study's run); the study's run has no value under the
    trials' metric names (its own are `study/...`), so it sorts after them instead of tying with its best trial."""
    columns = [f"metrics.`{m}`" for m in (metric, "test_mse", "test_mae")]
    columns += [f"params.`{k}`" for k in searched] + ["attributes.`Models`", "attributes.`Dataset`"]
    view = {"selectedColumns": columns, "orderByKey": f"metrics.`{metric}`", "orderByAsc": ascending,
            **chart_view(metric, searched)}
    for key, value in {"mlflow.experimentKind": "custom_model_development", DESCRIPTION_TAG: description,
                       f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(view)}.items():
        client.set_experiment_tag(experiment_id, key, value)


SEARCH_SECTION = "timevlm-search"  # the chart view's first section


def chart_view(metric: str, searched: list[str]) -> dict[str, Any]:
    """The chart view's first section, in the form MLflow's runs page keeps its charts (`compareRunSections`,
    `compareRunCharts`): the searched parameters against the selection metric (parallel coordinates), then
    the validation and training curves per epoch. The page adds every other metric below it, in sections of
    its own."""
    card = {"isGenerated": False, "deleted": False, "metricSectionId": SEARCH_SECTION, "runsCountToCompare": 10}
    curve = {**card, "type": "LINE", "selectedMetricKeys": None, "lineSmoothness": 0, "xAxisScaleType": "linear",
             "scaleType": "linear", "range": {}, "xAxisKey": "step", "selectedXAxisMetricKey": "",
             "yAxisKey": "metric", "yAxisExpressions": [], "ignoreOutliers": False, "useGlobalXaxisKey": True,
             "useGlobalLineSmoothing": True}
    charts = [{**curve, "uuid": f"{SEARCH_SECTION}-{m}", "metricKey": m, "displayName": m}
              for m in ("val_mse", "train_loss")]
    params = [k for k in searched if k != "cell"]
    if params:
        charts.insert(0, {**card, "type": "PARALLEL", "uuid": f"{SEARCH_SECTION}-parallel",
                          "selectedParams": params, "selectedMetrics": [metric], "showAllRuns": False})
    section = {"uuid": SEARCH_SECTION, "name": f"Search: {', '.join(params)} against {metric}" if params
               else "Curves", "display": True, "isReordered": True, "deleted": False, "isGenerated": False}
    return {"compareRunSections": [section], "compareRunCharts": charts, "isAccordionReordered": True}


def experiment_url(base: str, experiment_id: str) -> str:
    """The study's runs table in the MLflow UI. The UI's sidebar has a GenAI/model-training switch kept in the
    browser (GenAI by default, which overrides the experiment's kind); `workflowType` in the URL sets it."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={VIEW_KEY}")


def default_tracking_uri(base: Path | None = None) -> str:
    """The embedded store under `base` (made by `check_reachable` when first used)."""
    return f"sqlite:///{(base or Path.cwd()) / 'mlruns' / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of an embedded `sqlite:///` store (MLflow's or Optuna's), else None."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def default_artifact_root(tracking_uri: str) -> str | None:
    """For the embedded sqlite store, artifacts go to a folder beside the database."""
    db = sqlite_path(tracking_uri)
    return str(db.parent / "artifacts") if db else None  # a tracking server decides its own artifact root


class LogFailures:
    count = 0


def backoff(fn: Callable[[], T], *, tries: int | None = None, timeout_s: float | None = None,
            give_up: Callable[[Exception], bool] = lambda e: False, first_s: float = 0.2, cap_s: float = 10.0) -> T:
    """Call `fn` until it returns, waiting twice as long after each failure (from first_s, at most cap_s), for
    `tries` calls or until timeout_s has passed; the last exception, or one `give_up` says retrying cannot
    fix, is raised. The one retry loop of the platform's MLflow calls (DurableRun.call, wait_for)."""
    deadline = time.monotonic() + timeout_s if timeout_s is not None else None
    delay, attempt = first_s, 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - the caller decides what a final failure means
            out_of_tries = tries is not None and attempt >= tries
            out_of_time = deadline is not None and time.monotonic() + delay > deadline
            if give_up(e) or out_of_tries or out_of_time:
                raise
        time.sleep(delay)
        delay = min(delay * 2, cap_s)


def wait_for(what: str, timeout_s: float, fn: Callable[[], T]) -> T | None:
    """Retry an MLflow call that cannot be journaled (creating a run: its id comes from the server) until it
    succeeds or timeout_s passes; then say so on stderr and return None."""
    try:
        return backoff(fn, timeout_s=timeout_s, first_s=0.5)
    except Exception as e:  # noqa: BLE001
        LogFailures.count += 1
        print(f"[timevlm-platform] WARNING: MLflow {what} failed for {timeout_s:.0f}s: {e!r}",
              file=sys.stderr, flush=True)
        return None


def first_use_lock(uri: str):
    """A lock around the first use of an embedded SQLite store (MLflow's or Optuna's), whose first client creates
    and migrates its tables: two studies starting at once on one machine otherwise race in the migration
    ("Online migration expected to match one row"). Servers and other databases need none."""
    db = sqlite_path(uri)
    return FileLock(f"{db}.lock") if db else contextlib.nullcontext()


def check_reachable(tracking_uri: str, timeout_s: float = 10.0) -> None:
    """Fail at start, not after an hour of training, if the tracking store cannot be used."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
    if db := sqlite_path(tracking_uri):  # an embedded store: its folder is made on first use
        db.parent.mkdir(parents=True, exist_ok=True)
    try:
        with first_use_lock(tracking_uri):
            MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"MLflow tracking URI {tracking_uri!r} is not usable: {type(e).__name__}: "
                          f"{str(e).splitlines()[0][:300]}") from None


def get_experiment_id(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = f"{artifact_root}/{name}" if artifact_root else None
    return client.create_experiment(name, artifact_location=location)


def find_run(client: MlflowClient, experiment_id: str, **tags: str):
    flt = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([experiment_id], filter_string=flt, max_results=1, order_by=["start_time DESC"])
    return runs[0] if runs else None


def parent_run(client: MlflowClient, experiment_id: str, study: str, resume: bool, params: dict[str, Any],
               tags: dict[str, str] | None = None) -> str:
    """The study's parent run: reused on --resume (no duplicate), new otherwise."""
    if resume:
        run = find_run(client, experiment_id, **{ROLE_TAG: "study", STUDY_TAG: study})
        if run is not None:
            client.update_run(run.info.run_id, status="RUNNING")
            return run.info.run_id
    run = client.create_run(experiment_id, run_name=study, tags={ROLE_TAG: "study", STUDY_TAG: study, **(tags or {})})
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def child_run(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str, name: str,
              tags: dict[str, str]) -> str:
    """The trial's nested run; a restarted trial finds and reuses its run instead of making another."""
    run = find_run(client, experiment_id, **{PARENT_TAG: parent_id, TRIAL_TAG: trial_id})
    if run is not None:
        client.update_run(run.info.run_id, status="RUNNING")
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=name,
                            tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id, ROLE_TAG: "trial", **tags})
    return run.info.run_id


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


SYSTEM_PREFIX = "system/"  # MLflow's UI shows such metrics under "System metrics", apart from the model's


def system(metrics: dict[str, Any]) -> dict[str, Any]:
    """Operational figures (sizes, cache and feature builds, timings, memory, tracking delivery) as MLflow names
    them, `system/<name>`: run pages, charts and compare views then open on the objective and the searched
    parameters, and the operational figures sit in MLflow's own "System metrics" section."""
    return {SYSTEM_PREFIX + k: v for k, v in metrics.items()}


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The entries MLflow can take as metrics: numbers, not booleans (ids and flags are tags)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def log_metrics(client: MlflowClient, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step or 0) for k, v in numeric(metrics).items()]
    if items:
        client.log_batch(run_id, metrics=items)


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(k, str(v)[:5000]) for k, v in tags.items()])


def finish(client: MlflowClient, run_id: str, ok: bool, reason: str = "", end_time: int | None = None) -> None:
    """End a run FINISHED or FAILED (with `failure_reason`); `end_time` (ms) when the end was decided earlier than
    now, e.g. a journaled call replayed after an outage."""
    if reason:
        set_tags(client, run_id, {"failure_reason": reason})
    client.set_terminated(run_id, status=RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED),
                          end_time=end_time)
