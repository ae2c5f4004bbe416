"""How a study reads in MLflow and on the console: stopped trials, the experiment's view, trial lines."""
from __future__ import annotations

import json

from mlflow.tracking import MlflowClient

from timevlm_platform import tracking
from timevlm_platform.console import trial_line
from timevlm_platform.runner import _close_stopped


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
    _close_stopped(c, exp, parent, {"t0", "t2"})
    run = c.get_run(stopped)
    assert run.info.status == "FINISHED"  # not FAILED, not KILLED: early stopping is a normal outcome
    assert run.info.run_name == "ETTh1-96 d_model=64 #00000 [stopped by ASHA at epoch 2]"
    assert run.data.tags[tracking.OUTCOME_TAG] == "stopped by ASHA at epoch 2"
    run = c.get_run(torn_down)  # Tune's verdict (STOPPED) wins over the teardown's error
    assert run.info.status == "FINISHED" and "failure_reason" not in run.data.tags
    assert run.data.tags[tracking.OUTCOME_TAG] == "stopped by ASHA at epoch 1"
    assert c.get_run(done).info.run_name == "ETTh1-96 d_model=32 #00001"  # finished trials are left alone
    assert c.get_run(running).info.status == "RUNNING"  # no verdict of STOPPED: not called stopped
    _close_stopped(c, exp, parent, {"t0", "t2"})  # a second call (e.g. --resume) renames nothing twice
    assert c.get_run(stopped).info.run_name == "ETTh1-96 d_model=64 #00000 [stopped by ASHA at epoch 2]"


def test_experiment_opens_on_runs_with_the_studys_columns(tmp_path):
    c = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = c.create_experiment("timevlm-x")
    tracking.setup_experiment(c, exp, "a study", "best_val_mse", ["model.d_model", "variant"])
    tags = c.get_experiment(exp).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[f"mlflow.sharedViewState.{tracking.VIEW_KEY}"])
    assert view["selectedColumns"][:5] == ["metrics.`best_val_mse`", "metrics.`test_mse`", "metrics.`test_mae`",
                                           "params.`model.d_model`", "params.`variant`"]
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
