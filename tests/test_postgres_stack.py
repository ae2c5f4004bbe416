"""The production stack of cluster/README.md, run for real: MLflow's backend store and Optuna's storage on
PostgreSQL, artifacts served by the tracking server (`cluster/mlflow/start_local_server.sh`, so workers need only
its URL), a Ray head started with `ray start`: a study interrupted and resumed through `ray job submit`, with a
second user's study on the same server, database, feature cache and cluster at the same time.

(The tracking-server outage runs on this stack too: tests/test_tracking_outage.py.)"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO
from mlflow_server import free_port
from postgres_server import tracking_server
from timevlm_platform import tracking

pytestmark = pytest.mark.slow

STUDY = {
    "name": "pgstack", "datasets": ["ETTh1"], "horizons": [24],
    "fixed": {"model": {"seq_len": 48, "d_model": 16, "d_fusion": 32, "memory_size": 8},
              "data": {"max_windows": 96}, "train": {"batch_size": 16, "patience": 10}},
    "search": {"model.norm_const": {"type": "choice", "values": [0.1, 0.4, 0.7, 1.0]},
               "model.d_model": {"type": "choice", "values": [8, 16]}},
    "budget": {"trials": 4, "epochs": 2}, "scheduler": {"type": "fifo"}, "seed": 3,
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
}


def _trial_runs(client, name="timevlm-pgstack"):
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id]) if exp else []
    return [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"], runs


def test_a_study_on_postgresql_interrupted_and_resumed_through_ray_job_submit(tmp_path, postgres, data_dir):
    """Two users at once on one stack: `pgstack` (4 Optuna trials, all training at once; its driver killed after
    the first finished, then `ray job submit ... --resume`) and `alice` (one trial). Nothing of either is lost or
    duplicated, the feature entries they share are built once in the (cold) cache, and the resume leaves alice's
    runs alone."""
    import mlflow
    import optuna

    mlflow_db, optuna_db = postgres.create_database("mlflow_stack"), postgres.create_database("optuna_stack")
    study_file, alice_file, cache = tmp_path / "pgstack.yaml", tmp_path / "alice.yaml", tmp_path / "cache"
    study_file.write_text(yaml.safe_dump(STUDY))
    alice_file.write_text(yaml.safe_dump({**STUDY, "name": "alice", "budget": {"trials": 1, "epochs": 2}}))
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}  # as `ray start` sets up a cluster by default
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    # five logical CPUs on the two-core machine: pgstack's four trials at once and alice's, each its own worker
    subprocess.run([ray_bin, "start", "--head", "--num-cpus", "5", "--port", str(gcs), "--include-dashboard",
                    "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                    "--disable-usage-stats"], check=True, capture_output=True, env=env)
    try:
        with tracking_server(mlflow_db, tmp_path / "artifacts", tmp_path / "server.log") as base:
            common = ["--tracking-uri", base, "--optuna-storage", optuna_db, "--storage-path", str(tmp_path / "ray"),
                      "--cache-dir", str(cache), "--data-dir", str(data_dir)]
            args = ["--study", str(study_file), *common]
            first, alice = (subprocess.Popen([sys.executable, "tune.py", *a, "--address", f"127.0.0.1:{gcs}"],
                                             cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                             text=True, start_new_session=True)
                            for a in (args, ["--study", str(alice_file), *common]))
            client, most_at_once, finished = MlflowClient(base), 0, []
            deadline = time.time() + 480
            while time.time() < deadline and first.poll() is None and not (most_at_once >= 4 and finished):
                time.sleep(0.5)
                try:
                    kids, _ = _trial_runs(client)
                except Exception:  # noqa: BLE001 - the experiment may not exist yet
                    continue
                most_at_once = max(most_at_once, sum(r.info.status == "RUNNING" for r in kids))
                finished = [r for r in kids if r.info.status == "FINISHED"]
            assert first.poll() is None, f"the study ended before it was interrupted:\n{first.stdout.read()[-3000:]}"
            assert most_at_once >= 4, f"at most {most_at_once} trials ran at once"
            os.killpg(first.pid, signal.SIGKILL)  # the study's driver dies; its trials go with it
            first.wait()
            done_before = {r.info.run_id for r in finished}
            alice_out = alice.communicate(timeout=600)[0]
            assert alice.returncode == 0, alice_out[-3000:]
            alice_kids, alice_runs = _trial_runs(client, "timevlm-alice")
            assert len(alice_runs) == 2 and len(alice_kids) == 1 and alice_kids[0].info.status == "FINISHED"
            alice_ends = {r.info.run_id: r.info.end_time for r in alice_runs}

            # the README's cluster command, continuing the study where it stopped
            job = subprocess.run([ray_bin, "job", "submit", "--address", f"http://127.0.0.1:{dashboard}",
                                  "--working-dir", str(REPO), "--", sys.executable, "tune.py", *args, "--resume"],
                                 cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
            assert job.returncode == 0 and "succeeded" in job.stdout, (job.stdout + job.stderr)[-4000:]

            kids, runs = _trial_runs(client)
            assert len(kids) == 4 and len(runs) == 5, [r.info.run_name for r in runs]  # none duplicated or lost
            assert done_before <= {r.info.run_id for r in kids}  # the finished trials were not run again
            for r in kids:
                assert r.info.status == "FINISHED", r.info.run_name
                assert [m.step for m in client.get_metric_history(r.info.run_id, "val_mse")] == [1, 2]
                assert {"test_mse", "test_mae"} <= set(r.data.metrics)
                assert {d.dataset.name for d in r.inputs.dataset_inputs} == {"ETTh1-train", "ETTh1-val",
                                                                            "ETTh1-test"}
                assert r.data.tags[tracking.MODEL_URI_TAG].startswith("models:/")
            parent = next(r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "study")
            assert parent.info.status == "FINISHED" and "study/test_mse" in parent.data.metrics
            # the registry's @best, its artifacts through the server: loads and forecasts
            version = client.get_model_version_by_alias("timevlm-pgstack-ETTh1-24", "best")
            best = min(kids, key=lambda r: r.data.metrics["best_val_mse"])
            assert version.run_id == best.info.run_id
            mlflow.set_tracking_uri(base)
            model = mlflow.pyfunc.load_model("models:/timevlm-pgstack-ETTh1-24@best")
            assert model.predict(np.zeros((2, 48, 7), np.float32)).shape == (2, 24, 7)
            assert list((tmp_path / "artifacts").rglob("MLmodel"))  # stored by the server, not by the workers
            # alice's runs are as her study left them; the three entries (train/val/test of ETTh1 at 48->24) were
            # built once between the two studies, by either one's up-front build or by a trial, never twice
            _, alice_after = _trial_runs(client, "timevlm-alice")
            assert {r.info.run_id: r.info.end_time for r in alice_after} == alice_ends
            built = sum(r.data.metrics.get("system/features_built", 0) + r.data.metrics.get("system/cache_builds", 0)
                        for r in [*runs, *alice_after])
            assert built == 3 and len(list(cache.glob("*.parquet"))) == 3
            kept = optuna.load_study(study_name="timevlm-alice/alice-ETTh1-24", storage=optuna_db)
            assert len(kept.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 1
            # Optuna's record on PostgreSQL: the four trials, told once each, each linked to its MLflow run
            study = optuna.load_study(study_name="timevlm-pgstack/pgstack-ETTh1-24", storage=optuna_db)
            complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
            assert len(complete) == 4 and study.metric_names == ["best_val_mse"]
            assert {t.user_attrs["mlflow_run_id"] for t in complete} == {r.info.run_id for r in kids}
    finally:
        subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env)
