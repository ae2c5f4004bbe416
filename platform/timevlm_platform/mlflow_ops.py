"""The MLflow calls a run's journal (spool.DurableRun) holds, each by name: sent when the call is made, or replayed
from the journal after an outage, so each must be safe to run twice. The plain ones (metrics, params, tags,
artifacts, dataset inputs, publishing a logged model, ending the run) and the study's composite calls, made of
several requests that read what they need from the server when it answers (closing the runs of trials the
scheduler stopped, failing a trial, marking a cell's best trial and registering its model)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mlflow.entities import Metric, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from timevlm_platform import model_logging, tracking
from timevlm_platform.console import PREFIX


def _metrics(client: MlflowClient, run_id: str, points: list[list]) -> None:
    client.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in points])


def _artifact(client: MlflowClient, run_id: str, path: str, artifact_path: str | None) -> None:
    if Path(path).is_dir():
        client.log_artifacts(run_id, path, artifact_path)
    else:
        client.log_artifact(run_id, path, artifact_path)


def _inputs(client: MlflowClient, run_id: str, datasets: list[dict]) -> None:
    from mlflow.entities import Dataset, DatasetInput, InputTag

    client.log_inputs(run_id, datasets=[
        DatasetInput(Dataset(**d["dataset"]), tags=[InputTag("mlflow.data.context", d["context"])])
        for d in datasets])


def _terminate(client: MlflowClient, run_id: str, status: str, end_time: int) -> None:
    tracking.finish(client, run_id, ok=status == RunStatus.to_string(RunStatus.FINISHED), end_time=end_time)


def close_stopped_runs(client: MlflowClient, parent_id: str, experiment_id: str, stopped: list[str],
                   scheduler: str) -> None:
    """A trial the scheduler stopped early is a normal outcome, not an error: its run is FINISHED and its name
    and description say at which epoch it stopped. The run may still be RUNNING (its driver was ended before
    it could close the run), or FAILED: the driver's TorchTrainer can raise while Tune tears the trial down,
    and the driver then reports the teardown as a failure; both are corrected here. `stopped`:
    the trial ids Tune reports as STOPPED. Runs already closed so are left alone (a replay changes nothing)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
                              max_results=10000)
    for run in runs:
        if run.data.tags.get(tracking.TRIAL_TAG) not in stopped or tracking.OUTCOME_TAG in run.data.tags:
            continue
        epoch = int(run.data.metrics.get("epoch", 0))
        outcome = f"stopped by {scheduler} at epoch {epoch}"
        note = run.data.tags.get(tracking.DESCRIPTION_TAG, "")
        tracking.set_tags(client, run.info.run_id, {
            tracking.OUTCOME_TAG: outcome, "stopped_by": f"scheduler ({scheduler} early stop)",
            tracking.DESCRIPTION_TAG: f"{note}\n\n**{outcome.capitalize()}**: its validation loss was in the "
                                      f"worse part of the trials that reached that epoch."})
        client.update_run(run.info.run_id, name=f"{run.info.run_name} [{outcome}]")
        _settle_stopped(client, run.info.run_id)


def end_failed_trial(client: MlflowClient, run_id: str, reason: str, end_time: int) -> None:
    """A trial's run ends FAILED with `failure_reason`, unless the study has closed it as stopped by its scheduler
    (`close_stopped_runs`): a stopped trial's driver can still be inside its TorchTrainer after Tune has finished,
    and the teardown's error (the Train controller's placement group removed) then arrives after the study's
    verdict, during it, or is replayed from the journal after it. Tune's verdict wins in every order: both sides
    end by settling the run from what it holds after their own write (`_settle_stopped`)."""
    if _settle_stopped(client, run_id):
        return
    tracking.finish(client, run_id, ok=False, reason=reason, end_time=end_time)
    _settle_stopped(client, run_id)  # the verdict may have landed between the check above and this write


def _settle_stopped(client: MlflowClient, run_id: str) -> bool:
    """If the run carries the scheduler's verdict, make the run say it: FINISHED at its last report, with no
    `failure_reason` (the teardown's error, not the trial's). True if it carries the verdict. Called after each
    side's write, so whichever of the study and the dying driver writes last, a later read sees the verdict."""
    run = client.get_run(run_id)
    if tracking.OUTCOME_TAG not in run.data.tags:
        return False
    if "failure_reason" in run.data.tags:
        try:
            client.delete_tag(run_id, "failure_reason")
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":  # else the other side deleted it first
                raise
    # it ended with its last report, not now (the study closes it after every trial has finished)
    last = [m.timestamp for m in client.get_metric_history(run_id, "epoch")]
    tracking.finish(client, run_id, ok=True, end_time=max(last) if last else None)
    return True


BEST_MARK = "[best] "  # in front: the runs table cuts long names at the end


def mark_best(client: MlflowClient, parent: str, experiment_id: str, trial: str, prefix: str, tags: dict[str, str],
               register: dict[str, Any] | None, tracking_uri: str) -> str | None:
    """Mark a cell's best trial (its name starts with BEST_MARK), register its logged model as `register["name"]`
    (once: a replay finds the version it made), and note both on the study's run. Returns "name/version" or None.
    A journaled call of the study's run: it reads the trial's run (its id, its model) when the server answers."""
    run = tracking.find_run(client, experiment_id, **{tracking.PARENT_TAG: parent, tracking.TRIAL_TAG: trial})
    registered = None
    if run is not None:
        tags = {**tags, f"{prefix}.run_id": run.info.run_id}
        tracking.set_tags(client, run.info.run_id, {tracking.BEST_TAG: "true"})
        if not run.info.run_name.startswith(BEST_MARK):
            client.update_run(run.info.run_id, name=f"{BEST_MARK}{run.info.run_name}")
        model_uri = run.data.tags.get(tracking.MODEL_URI_TAG)
        if model_uri and register:
            version = model_logging.register_best(client, tracking_uri, register["name"], model_uri,
                                                  run.info.run_id, register["tags"], register["description"])
            registered = f"{register['name']}/{version}"
            tags[f"{prefix}.registered_model"] = registered
            print(f"{PREFIX} registered {register['name']} version {version} (alias @best): trial {trial}, "
                  f"model {model_uri}", flush=True)
    tracking.set_tags(client, parent, tags)
    return registered


OPS: dict[str, Callable[..., Any]] = {
    "metrics": _metrics, "params": tracking.log_params, "tags": tracking.set_tags, "artifact": _artifact,
    "inputs": _inputs, "model": model_logging.publish_model, "terminate": _terminate,
    "close_stopped": close_stopped_runs, "fail_trial": end_failed_trial, "mark_best": mark_best}
FILE_ARGS = {"artifact": "path", "model": "path"}  # ops whose file or folder is copied into the journal
