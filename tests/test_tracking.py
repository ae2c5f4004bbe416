"""How a study reads in MLflow and on the console: stopped trials, the experiment's view, trial lines."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd

from mlflow.tracking import MlflowClient

from timevlm_platform import mlflow_ops, tracking
from timevlm_platform.console import trial_line
from timevlm_platform.spool import DurableRun
from timevlm_platform.study_results import close_stopped, fail_trial, trial_busy_seconds, utilisation


def test_a_trial_stopped_by_asha_is_finished_and_says_when(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-asha")
    parent = tracking.parent_run(c, exp, "asha", False, {})
    stopped = tracking.child_run(c, exp, parent, "t0", "ETTh1-96 d_model=64 #00000", {})
    torn_down = tracking.child_run(c, exp, parent, "t2", "ETTh1-96 d_model=16 #00002", {})
    done = tracking.child_run(c, exp, parent, "t1", "ETTh1-96 d_model=32 #00001", {})
    running = tracking.child_run(c, exp, parent, "t3", "ETTh1-96 d_model=8 #00003", {})
    tracking.log_metrics(c, stopped, {"epoch": 2, "val_mse": 0.9}, step=2)
    tracking.log_metrics(c, torn_down, {"epoch": 1, "val_mse": 1.1}, step=1)
    # the driver of a stopped trial can see its TorchTrainer raise during the teardown and report a failure
    tracking.finish(c, torn_down, False, reason="TrainingFailedError: the controller was stopped")
    tracking.finish(c, done, True)
    study = DurableRun(c, parent, tmp_path / "spool", count_delays=False)
    last_report = c.get_metric_history(stopped, "epoch")[-1].timestamp
    time.sleep(0.05)
    close_stopped(study, exp, {"t0", "t2"})
    assert not study.pending()
    run = c.get_run(stopped)
    assert run.info.status == "FINISHED"  # not FAILED, not KILLED: early stopping is a normal outcome
    assert run.info.end_time == last_report  # it ended at its last report, not when the study closed it
    assert run.info.run_name == "ETTh1-96 d_model=64 #00000 [stopped by ASHA at epoch 2]"
    assert run.data.tags[tracking.OUTCOME_TAG] == "stopped by ASHA at epoch 2"
    run = c.get_run(torn_down)  # Tune's verdict (STOPPED) wins over the teardown's error
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert run.data.tags[tracking.OUTCOME_TAG] == "stopped by ASHA at epoch 1"
    assert c.get_run(done).info.run_name == "ETTh1-96 d_model=32 #00001"  # finished trials are left alone
    assert c.get_run(running).info.status == "RUNNING"  # no verdict of STOPPED: not called stopped
    close_stopped(study, exp, {"t0", "t2"})  # a second call (e.g. --resume) renames nothing twice
    assert c.get_run(stopped).info.run_name == "ETTh1-96 d_model=64 #00000 [stopped by ASHA at epoch 2]"
    # the teardown's error can also come after the verdict (the stopped trial's driver still in its
    # TorchTrainer when Tune has finished, or its journal replayed at the study's end): the verdict stands
    fail_trial(DurableRun(c, stopped, tmp_path / "spool"), "ActorDiedError: placement group was removed")
    run = c.get_run(stopped)
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    fail_trial(DurableRun(c, running, tmp_path / "spool"), "TrainingFailedError: worker died 3 times")
    run = c.get_run(running)  # a trial no scheduler stopped fails with its reason
    assert run.info.status == "FAILED" and run.data.tags["failure_reason"].startswith("TrainingFailedError")


def test_a_stop_verdict_landing_inside_the_drivers_failure_still_wins(tmp_path, monkeypatch):
    """The order CI met: the dying driver reads its run (no verdict yet), the study closes the run as stopped,
    then the driver's FAILED write lands. The run must end FINISHED, without the teardown's failure_reason."""
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-asha-race")
    parent = tracking.parent_run(c, exp, "asha", False, {})
    trial = tracking.child_run(c, exp, parent, "t0", "ETTh1-24 d_model=32 #00000", {})
    tracking.log_metrics(c, trial, {"epoch": 2, "val_mse": 0.9}, step=2)
    study = DurableRun(c, parent, tmp_path / "spool", count_delays=False)
    real_finish = tracking.finish

    def verdict_first(client, run_id, ok, reason="", end_time=None):
        if not ok:  # the driver has checked for a verdict and is about to write FAILED: the study closes now
            monkeypatch.setattr(tracking, "finish", real_finish)
            close_stopped(study, exp, {"t0"})
        real_finish(client, run_id, ok, reason=reason, end_time=end_time)

    monkeypatch.setattr(tracking, "finish", verdict_first)
    mlflow_ops.end_failed_trial(c, trial, "ActorDiedError: its placement group was removed", int(time.time() * 1000))
    run = c.get_run(trial)
    assert run.data.tags[tracking.OUTCOME_TAG] == "stopped by ASHA at epoch 2"
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags, (run.info.status, run.data.tags)
    assert run.info.end_time == c.get_metric_history(trial, "epoch")[-1].timestamp


def test_experiment_opens_on_runs_with_the_studys_columns(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-x")
    tracking.setup_experiment(c, exp, "a study", "best_val_mse", ["model.d_model", "variant"])
    tags = c.get_experiment(exp).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    assert (view["orderByKey"], view["orderByAsc"]) == ("metrics.`best_val_mse`", True)  # best first
    assert view["selectedColumns"][:5] == ["metrics.`best_val_mse`", "metrics.`test_mse`", "metrics.`test_mae`",
                                           "params.`model.d_model`", "params.`variant`"]
    # the chart view's first section: the searched parameters against the metric, then the curves
    (section,), charts = view["compareRunSections"], view["compareRunCharts"]
    assert {c["metricSectionId"] for c in charts} == {section["uuid"]}
    assert [c["type"] for c in charts] == ["PARALLEL", "LINE", "LINE"]
    assert (charts[0]["selectedParams"], charts[0]["selectedMetrics"]) == (["model.d_model", "variant"],
                                                                          ["best_val_mse"])
    assert [c["metricKey"] for c in charts[1:]] == ["val_mse", "train_loss"]
    assert tracking.experiment_url("http://h:5000/", exp) == (
        f"http://h:5000/#/experiments/{exp}/runs?workflowType=machine_learning&viewStateShareKey=timevlm")


def test_one_console_line_per_trial_outcome():
    cfg = {"model.d_model": 32, "model.norm_const": 0.4, "cell": "ETTh1-96"}
    done = trial_line("ETTh1-96", cfg, "trial_x_00003", {"epoch": 3, "time_total_s": 61.2, "best_val_mse": 0.7755,
                                                          "test_mse": 0.4885, "test_mae": 0.4669},
                      "best_val_mse", "DONE", 2)
    assert done == ("[timevlm-platform] trial 2 ETTh1-96 d_model=32 norm_const=0.4 #00003: best_val_mse 0.7755, "
                    "test MSE 0.4885, MAE 0.4669 (3 epochs, 61s)")
    stopped = trial_line("ETTh1-96", cfg, "t_00004", {"epoch": 1, "best_val_mse": 0.9}, "best_val_mse", "DONE", 3)
    assert "stopped by ASHA at epoch 1" in stopped
    assert "failed after 2 epoch(s)" in trial_line("ETTh1-96", cfg, "t_5", {"epoch": 2}, "best_val_mse", "ERROR", 4)


def test_a_trials_logged_model_carries_its_name_params_metrics_and_registered_version(tmp_path):
    from timevlm_platform import model_logging
    from timevlm_platform.spool import DurableRun

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("timevlm-models", artifact_location=str(tmp_path / "artifacts"))
    parent = tracking.parent_run(c, exp, "s", False, {})
    run_id = tracking.child_run(c, exp, parent, "t0", "ETTh1-96 norm_const=0.4 #00003", {})
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    run = DurableRun(c, run_id, tmp_path / "spool")
    name = model_logging.logged_model_name("ETTh1-96 norm_const=0.4 #00003")
    assert name == "ETTh1-96_norm_const-0p4_00003"  # MLflow refuses "." in a logged model's name
    uri_a = run.log_model(folder, name=name, params={"model.d_model": 64}, metrics={"test_mse": 0.42, "n": True})
    assert run.log_model(folder, name=name) == uri_a  # a replayed call finds its model, makes no second one
    model = c.get_logged_model(uri_a.removeprefix("models:/"))
    assert model.name == name and model.params == {"model.d_model": "64"}
    assert {m.key: m.value for m in model.metrics} == {"test_mse": 0.42}
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    version = model_logging.register_best(c, uri, "timevlm-s-ETTh1-96", uri_a, run_id, {"test_mse": 0.42}, "best")
    assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == before  # the process-wide URIs put back
    mv = c.get_model_version("timevlm-s-ETTh1-96", version)
    assert (mv.source, mv.run_id, mv.description) == (uri_a, run_id, "best")  # registered from models:/<id>
    links = json.loads(c.get_logged_model(model.model_id).tags["mlflow.modelVersions"])
    assert links == [{"name": "timevlm-s-ETTh1-96", "version": int(version)}]  # what the model's page shows
    assert str(c.get_model_version_by_alias("timevlm-s-ETTh1-96", "best").version) == version


def test_a_call_mlflow_refuses_is_reported_and_skipped_not_kept_ahead_of_the_rest(tmp_path, capsys):
    from timevlm_platform.spool import DurableRun

    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-refused")
    run_id = tracking.child_run(c, exp, tracking.parent_run(c, exp, "s", False, {}), "t0", "t0", {})
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "MLmodel").write_text("flavors: {}\n")
    run = DurableRun(c, run_id, tmp_path / "spool")
    assert run.log_model(folder, name="bad.name") is None  # refused: the server is up, the call is wrong
    assert "MLflow refused run" in capsys.readouterr().err and not run.pending()
    # a refused call already in a journal (kept during an outage) is skipped when it is replayed
    run._append("model", {"path": str(folder), "name": "bad.name", "params": {}, "metrics": {}})
    run._append("metrics", {"points": [["test_mse", 0.5, 1, 0]]})
    run.terminate(True)
    assert not run.pending() and c.get_run(run_id).info.status == "FINISHED"
    assert c.get_run(run_id).data.metrics["test_mse"] == 0.5


def test_two_trials_logging_one_dataset_at_once_is_a_race_retried_not_a_refusal(tmp_path, monkeypatch):
    """Two trials that log the same dataset as an input at the same moment: the second insert hits the store's
    unique constraint (MLflow answers BAD_REQUEST); sent again, the call finds the dataset and succeeds."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST, INVALID_PARAMETER_VALUE

    from timevlm_platform import spool

    assert spool.rejected(MlflowException("name 'bad.name' is invalid", error_code=INVALID_PARAMETER_VALUE))
    race = MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                           "datasets.name, datasets.digest", error_code=BAD_REQUEST)
    assert not spool.rejected(race)
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-race")
    run_id = tracking.child_run(c, exp, tracking.parent_run(c, exp, "s", False, {}), "t0", "t0", {})
    real, calls = MlflowClient.log_inputs, []

    def racing(self, *args, **kwargs):  # the first attempt loses the race to another trial
        calls.append(1)
        if len(calls) == 1:
            raise race
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", racing)
    run = spool.DurableRun(c, run_id, tmp_path / "spool")
    data = {"name": "ETTh1-val", "digest": "abc", "source_type": "local", "source": "/d/ETTh1.csv"}
    run.log_inputs([{"dataset": data, "context": "val"}])
    assert len(calls) == 2 and not run.pending()
    assert [d.dataset.name for d in c.get_run(run_id).inputs.dataset_inputs] == ["ETTh1-val"]


def test_utilisation_counts_only_the_trial_phase(tmp_path):
    """Busy slot-seconds are each run's start to end cut to the trial phase, so two slots over 100 s read at
    most 1.0 however late the study closes a run (it read 1.04 when a stopped run's end was the study's)."""
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-busy")
    parent = tracking.parent_run(c, exp, "busy", False, {})
    since, until = 1_000.0, 1_100.0  # the trial phase, in seconds
    spans = [(990, 1_050), (1_000, 1_100), (1_050, 1_130)]  # earlier start, full, closed after the phase ended
    for i, (start, end) in enumerate(spans):
        run = c.create_run(exp, start_time=int(start * 1000), tags={tracking.PARENT_TAG: parent}).info.run_id
        c.set_terminated(run, end_time=int(end * 1000))
    busy = trial_busy_seconds(c, exp, parent, since, pd.DataFrame(), until=until)
    assert busy == 50 + 100 + 50
    assert utilisation(busy, 2, until - since) == 1.0


def test_a_registered_name_does_not_repeat_the_dataset_a_study_is_named_for():
    from timevlm_platform.model_logging import registered_name

    assert registered_name("default", "ETTh1-96") == "timevlm-default-ETTh1-96"
    assert registered_name("norm_const-epochs3-ETTh1", "ETTh1-96") == "timevlm-norm_const-epochs3-ETTh1-96"
    assert registered_name("d_model-epochs3-ETTh1-percent10", "ETTh1-96") == "timevlm-d_model-epochs3-ETTh1-percent10-96"


def test_the_journal_knows_every_call_without_importing_the_study_code():
    """A process that replays a journal imports only the spool: the study's composite calls (closing stopped
    trials, failing a trial, marking the best) are there already, and the layers import one way (the spool
    never imports the study's results code, which imports the spool)."""
    code = ("import sys; from timevlm_platform import spool; "
            "assert {'close_stopped', 'fail_trial', 'mark_best', 'model'} <= set(spool.OPS), sorted(spool.OPS); "
            "assert 'timevlm_platform.study_results' not in sys.modules; "
            "assert 'timevlm_platform.runner' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
