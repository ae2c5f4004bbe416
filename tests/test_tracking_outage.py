"""The MLflow tracking server goes away mid-study and comes back: nothing a trial logged is lost; two local studies
at once. (Two studies at once against one server, database and cluster: tests/test_postgres_stack.py.)

A real `mlflow server` (SQLite backend) is stopped and started again on the same port: first under one run's
journal directly, then under a running study."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO
from mlflow_server import free_port, mlflow_server
from postgres_server import tracking_store
from timevlm_platform import tracking
from timevlm_platform.spool import DurableRun, delayed_counts


def test_journal_keeps_calls_in_order_while_the_server_is_away_and_sends_them_after(tmp_path):
    backend, port = f"sqlite:///{tmp_path / 'mlflow.db'}", free_port()
    log, spool = tmp_path / "server.log", tmp_path / "spool"
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with mlflow_server(backend, log, port=port, artifacts=tmp_path / "art") as base:
        client = MlflowClient(base)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        run = DurableRun(client, run_id, spool, retries=1)
        run.log_metrics({"val_mse": 1.0}, step=1)
        assert not run.pending()
    # the server is down: every call is kept, in order, with a copy of the file it refers to
    art = tmp_path / "forecast.png"
    art.write_bytes(b"\x89PNG fake")
    run.log_metrics({"val_mse": 0.9}, step=2)
    run.log_artifact(art, "plots")
    art.unlink()  # a temporary file gone before the server is back
    run.log_metrics({"val_mse": 0.8}, step=3)
    run.set_tags({"outcome": "done"})
    run.terminate(True)
    assert run.pending() and delayed_counts(spool) == (5, 5)
    with mlflow_server(backend, log, port=port, artifacts=tmp_path / "art") as base:
        client = MlflowClient(base)
        run.client = client
        run.log_metrics({"test_mse": 0.5})  # the next call sends the journal first, then itself
        assert not run.pending() and delayed_counts(spool) == (5, 0)
        r = client.get_run(run_id)
        assert [m.value for m in client.get_metric_history(run_id, "val_mse")] == [1.0, 0.9, 0.8]
        assert r.data.metrics["test_mse"] == 0.5 and r.data.metrics["system/tracking_calls_delayed"] == 5
        assert r.data.tags["outcome"] == "done" and r.info.status == "FINISHED"
        assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/forecast.png"]




@pytest.mark.slow
def test_server_stopped_mid_study_and_at_its_end_loses_nothing(tmp_path, shared_cache, postgres_or_none):
    """tune.py against a real server that is stopped twice: while the first trial trains (started again 15 s
    later), and after the last trial, before the study writes its outcome (started again 10 s later). Every
    trial run ends with every epoch's metrics, its test metrics, its plot and its model; no duplicate run; the
    study's run gets its summary metrics, trials.csv and best-trial tags, and the best model its registered
    version; the study says how many calls were delayed and that none is left. On the production stack (PostgreSQL
    behind `cluster/mlflow/start_local_server.sh`) where PostgreSQL is installed, else on SQLite."""
    backend, port = None, free_port()
    log, pause = tmp_path / "server.log", tmp_path / "pause"
    pause.mkdir()
    study = {"name": "outage", "datasets": ["ETTh1"], "horizons": [24],
             "fixed": {"model": {"seq_len": 48, "d_model": 16, "d_fusion": 32, "memory_size": 8},
                       "data": {"max_windows": 96}, "train": {"batch_size": 32, "patience": 10}},
             "search": {"model.norm_const": {"type": "grid", "values": [0.4, 1.0]}}, "searcher": "grid",
             "budget": {"trials": 2, "epochs": 4}, "scheduler": {"type": "fifo"},
             "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent": 1}}
    (tmp_path / "outage.yaml").write_text(yaml.safe_dump(study))
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
           "TIMEVLM_FAULTS": json.dumps({"epoch_sleep_s": 3, "pause_at": {"study_end": str(pause)}})}
    env.pop("RAY_ADDRESS", None)
    with tracking_store(postgres_or_none, tmp_path, port=port, log=log, backend=backend) as (base, backend):
        proc = subprocess.Popen([sys.executable, "tune.py", "--study", str(tmp_path / "outage.yaml"),
                                 "--tracking-uri", base, "--storage-path", str(tmp_path / "ray"),
                                 "--cache-dir", shared_cache], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
        reader.start()
        client, deadline = MlflowClient(base), time.time() + 300
        while time.time() < deadline and proc.poll() is None:  # wait for the first epoch of the first trial
            exp = client.get_experiment_by_name("timevlm-outage")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if any(len(client.get_metric_history(r.info.run_id, "val_mse")) >= 1 for r in runs):
                break
            time.sleep(0.5)
        assert proc.poll() is None, "".join(out)[-3000:]
    # the server is stopped here ...
    time.sleep(15)
    with tracking_store(postgres_or_none, tmp_path, port=port, log=log, backend=backend):  # ... and back
        deadline = time.time() + 600
        while not (pause / "paused").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)  # the trials are done and sent; the study is about to write its outcome
        assert (pause / "paused").exists(), "".join(out)[-3000:]
    # stopped again while the study writes its outcome
    (pause / "resume").touch()
    time.sleep(10)
    # ... and back
    with tracking_store(postgres_or_none, tmp_path, port=port, log=log, backend=backend) as (base, backend):
        assert proc.wait(timeout=600) == 0, "".join(out)[-3000:]
        reader.join(timeout=10)
        text = "".join(out)
        client = MlflowClient(base)
        exp = client.get_experiment_by_name("timevlm-outage")
        runs = client.search_runs([exp.experiment_id])
        kids = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
        assert len(kids) == 2 and len(runs) == 3  # no run duplicated or lost
        for r in kids:
            assert r.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(r.info.run_id, "val_mse")] == [1, 2, 3, 4]
            assert {"test_mse", "test_mae"} <= set(r.data.metrics)
            assert [a.path for a in client.list_artifacts(r.info.run_id, "plots")] == ["plots/forecast_test.png"]
            assert r.data.tags[tracking.MODEL_URI_TAG].startswith("models:/")
        delayed = sum(r.data.metrics.get("system/tracking_calls_delayed", 0) for r in kids)
        assert delayed > 0  # the first outage really fell inside a trial
        # the study's outcome, written while the server was away, arrived
        parent = next(r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "study")
        assert parent.info.status == "FINISHED"
        assert {"study/best_val_mse", "study/test_mse", "study/test_mae", "system/cluster_utilisation"} \
            <= set(parent.data.metrics)
        assert sorted(a.path for a in client.list_artifacts(parent.info.run_id)) == [
            "selection_gap.csv", "trials.csv"]
        best = next(r for r in kids if r.data.tags.get(tracking.BEST_TAG) == "true")
        assert best.info.run_name.startswith("[best] ")
        assert parent.data.tags["best.ETTh1.24.run_id"] == best.info.run_id
        version = client.get_model_version_by_alias("timevlm-outage-ETTh1-24", "best")
        assert version.run_id == best.info.run_id
        assert parent.data.tags["best.ETTh1.24.registered_model"] == f"timevlm-outage-ETTh1-24/{version.version}"
        assert parent.data.metrics["system/tracking_calls_waiting"] == 0
        assert parent.data.metrics["system/tracking_calls_delayed"] > delayed  # the study's own calls too
        assert "were delayed while the tracking server was away; all sent" in text
        assert "registered timevlm-outage-ETTh1-24 version 1" in text
        print(next(line for line in text.splitlines() if "were delayed" in line))  # for the log (pytest -s)
        # and the model logged after the outage loads and forecasts
        import mlflow

        mlflow.set_tracking_uri(base)
        model = mlflow.pyfunc.load_model(kids[0].data.tags[tracking.MODEL_URI_TAG])
        assert model.predict(np.zeros((1, 48, 7), np.float32)).shape == (1, 24, 7)


def _tiny_study(path, name, norm_const):
    """One trial at `norm_const`."""
    path.write_text(yaml.safe_dump({
        "name": name, "datasets": ["ETTh1"], "horizons": [24],
        "fixed": {"model": {"seq_len": 48, "d_model": 16, "d_fusion": 32, "memory_size": 8},
                  "data": {"max_windows": 64}, "train": {"batch_size": 32}},
        "search": {"model.norm_const": {"type": "grid", "values": [norm_const]}}, "searcher": "grid",
        "budget": {"trials": 1, "epochs": 2}, "scheduler": {"type": "fifo"},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}))
    return path


@pytest.mark.slow
def test_two_local_studies_at_once_each_on_its_own_ray(tmp_path, shared_cache):
    """Two `python tune.py` on one machine, each with its own local Ray (no --address), at the same time: Train
    V2's State API polls once found both clusters and failed a trial with "Found multiple active Ray instances".
    Both finish, every trial FINISHED, and neither cluster is the other's."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the one local store both would share by default

    def tune(name):
        study = _tiny_study(tmp_path / f"{name}.yaml", name, 0.4 if name == "carol" else 1.0)
        return subprocess.Popen([sys.executable, "tune.py", "--study", str(study), "--tracking-uri", uri,
                                 "--cache-dir", shared_cache, "--storage-path", str(tmp_path / "ray")], cwd=REPO,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)

    procs = {name: tune(name) for name in ("carol", "dave")}
    outs = {name: p.communicate(timeout=600)[0] for name, p in procs.items()}
    client = MlflowClient(uri)
    for name, p in procs.items():
        assert p.returncode == 0, outs[name][-3000:]
        assert "multiple active Ray instances" not in outs[name], outs[name][-3000:]
        exp = client.get_experiment_by_name(f"timevlm-{name}")
        kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
        assert len(kids) == 1 and kids[0].info.status == "FINISHED"
    nodes = {name: {r.data.tags.get("ray_node_id") for r in client.search_runs(
        [client.get_experiment_by_name(f"timevlm-{name}").experiment_id]) if r.data.tags.get("ray_node_id")}
        for name in procs}
    assert nodes["carol"] and nodes["dave"] and not nodes["carol"] & nodes["dave"]  # two clusters, not one
