"""Optuna's state in a database: what a searched study's sampler knows survives the driver (Tune pickles the
searcher into its experiment checkpoint and restores it on --resume; the trials themselves live in the DB)."""
from __future__ import annotations

import optuna
import pytest

from timevlm_platform.search_space import forget_optuna_study
from timevlm_platform.settings import default_optuna_storage
from timevlm_platform.search_space import param_space, searcher
from timevlm_platform.study import parse_study

SPEC = parse_study({"name": "opt", "seed": 3, "budget": {"trials": 6, "epochs": 1},
                    "search": {"model.d_model": {"type": "choice", "values": [16, 32, 64, 128]},
                               "model.norm_const": {"type": "choice", "values": [0.1, 0.4, 0.7, 1.0]}}})


def _searcher(url):
    s = searcher(SPEC, url, "timevlm-opt/opt-ETTh1-96")
    s.set_search_properties("best_val_mse", "min", param_space(SPEC))
    return s


def _complete(s, trial_id: str, value: float) -> dict:
    """A trial that ran to its end: its final report carries the test metrics."""
    cfg = s.suggest(trial_id)
    s.on_trial_result(trial_id, {"best_val_mse": value + 0.1, "epoch": 1, "mlflow_run_id": f"run-{trial_id}"})
    s.on_trial_complete(trial_id, {"best_val_mse": value, "test_mse": value, "epoch": 1, **cfg})
    return cfg


def test_a_stopped_trial_is_pruned_and_each_trial_names_its_run_and_epochs(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    s = _searcher(url)
    _complete(s, "t0", 0.5)
    s.suggest("t1")  # stopped by the scheduler after epoch 1: its last result has no test metrics
    s.on_trial_result("t1", {"best_val_mse": 0.9, "epoch": 1, "mlflow_run_id": "run-t1"})
    s.on_trial_complete("t1", {"best_val_mse": 0.9, "epoch": 1})
    study = optuna.load_study(study_name="timevlm-opt/opt-ETTh1-96", storage=url)
    t0, t1 = study.trials
    assert (t0.state, t1.state) == (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert study.metric_names == ["best_val_mse"] and t1.user_attrs["mlflow_run_id"] == "run-t1"
    assert t0.intermediate_values == {1: pytest.approx(0.6)}  # one point per epoch, at that epoch


def test_resumed_searcher_continues_from_every_finished_trial(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = _searcher(url)
    handed = [_complete(first, f"t{i}", 1.0 - 0.1 * i) for i in range(2)]
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's checkpoint of the searcher, taken here
    handed.append(_complete(first, "t2", 0.5))  # ... and one more trial finishes before the driver dies

    resumed = _searcher(url)
    resumed.restore(str(tmp_path / "searcher.pkl"))
    done = resumed._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(done) == 3  # the DB has every finished trial, including the one after the checkpoint
    assert resumed._ot_study.best_value == pytest.approx(0.5)
    nxt = _complete(resumed, "t3", 0.2)
    study = optuna.load_study(study_name="timevlm-opt/opt-ETTh1-96", storage=url)  # what optuna-dashboard reads
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 4
    assert study.best_params == {"model.d_model": nxt["model.d_model"], "model.norm_const": nxt["model.norm_const"]}
    assert nxt not in handed[:2]  # the restored searcher still does not hand out a configuration twice


def test_fresh_run_forgets_the_old_study_and_default_lives_beside_mlflow(tmp_path):
    url = default_optuna_storage(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", tmp_path / "home")
    assert url == f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}"
    assert default_optuna_storage("http://mlflow:5000", tmp_path) == f"sqlite:///{tmp_path / 'optuna.db'}"
    (tmp_path / "mlruns").mkdir()
    _complete(_searcher(url), "t0", 1.0)
    forget_optuna_study(url, "timevlm-opt/opt-ETTh1-96")
    forget_optuna_study(url, "timevlm-opt/opt-ETTh1-96")  # forgetting a study that is not there is fine
    assert _searcher(url)._ot_study.trials == []


def test_the_printed_optuna_dashboard_command_serves_the_study(tmp_path):
    """`tune.py` prints `optuna-dashboard <storage>`: the command is installed with the project and shows the
    study a searcher wrote."""
    import json
    import shutil
    import socket
    import subprocess
    import time
    import urllib.request

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    _complete(_searcher(url), "t0", 0.7)
    import os
    import sys

    # the venv's scripts also when its python is run without activating it
    exe = shutil.which("optuna-dashboard", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                 os.environ.get("PATH", "")]))
    assert exe, "optuna-dashboard is a dependency: README command 1 installs it"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, url, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 60, None
        while time.time() < deadline and body is None:
            try:
                body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5).read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "optuna-dashboard did not answer within 60 s"
        assert [s["study_name"] for s in body["study_summaries"]] == ["timevlm-opt/opt-ETTh1-96"]
    finally:
        proc.terminate()
        proc.wait(10)
