"""Faults injected into real studies, and what survives them:
a Ray Train worker killed mid-trial (restarted from its checkpoint, trial finishes), a trial whose loss
becomes NaN (marked failed with the reason, the study goes on), the driver killed mid-study (`--resume`
finishes it, nothing re-run or lost, no duplicate MLflow run), an unreachable MLflow URI (clear error at start)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO
from timevlm_platform import tracking
from timevlm_platform.runner import RunOptions, run_study
from timevlm_platform.study import load_study

pytestmark = pytest.mark.slow


def _study(tmp_path, name, values, epochs, windows=128, concurrent=1, horizons=(24,)):
    d = {"name": name, "datasets": ["ETTh1"], "horizons": list(horizons),
         "fixed": {"model": {"seq_len": 48, "d_model": 16, "d_fusion": 32, "memory_size": 8},
                   "data": {"max_windows": windows}, "train": {"batch_size": 16, "patience": 10}},
         "search": {"model.norm_const": {"type": "grid", "values": values}}, "searcher": "grid",
         "budget": {"trials": len(values), "epochs": epochs}, "scheduler": {"type": "fifo"},
         "resources": {"workers_per_trial": 1, "cpus_per_worker": 1, "max_concurrent": concurrent}}
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(d))
    return f


def _children(uri, exp_name):
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name(exp_name)
    runs = c.search_runs([exp.experiment_id]) if exp else []
    return c, [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"], runs


def _train_workers():
    return [p for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def test_worker_kill_and_nan_trial(tmp_path, shared_cache, monkeypatch):
    monkeypatch.setenv("TIMEVLM_FAULTS", json.dumps({"nan_after_epoch": 1, "when": {"model.norm_const": 0.7}}))
    # two trials side by side (the cluster's two CPUs): the NaN trial fails early and the third takes its slot
    spec = load_study(str(_study(tmp_path, "faults", [0.1, 0.7, 1.0], epochs=6, windows=256, concurrent=2)))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed, study_over = [], threading.Event()

    def killer():  # kill every Train worker alive once the first trial (norm_const 0.1) has logged epoch 3, so
        # that its Train controller has surely registered an earlier checkpoint (a report still buffered in a
        # worker when it dies is lost with it); whichever other trial is running then must survive it too.
        # Watches the study's progress, not the clock: a slow machine only makes it wait longer
        while not study_over.is_set() and not killed:
            time.sleep(0.3)
            try:
                c, kids, _ = _children(uri, "timevlm-faults")
            except Exception:  # noqa: BLE001 - the store may not exist yet
                continue
            first = [r for r in kids if r.data.params.get("model.norm_const") == "0.1"]
            if first and len(c.get_metric_history(first[0].info.run_id, "val_mse")) >= 3:
                for p in _train_workers():
                    p.kill()
                    killed.append(p.pid)

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        out = run_study(spec, RunOptions(tracking_uri=uri, storage_path=str(tmp_path / "ray"),
                                         cache_dir=shared_cache, verbose=0))
        study_over.set()
        t.join(5)
    finally:
        ray.shutdown()
    assert killed, "the worker was never killed"
    table = out["table"].set_index("norm_const")
    assert table.loc[0.1, "status"] == "DONE" and table.loc[1.0, "status"] == "DONE"
    assert table.loc[0.7, "status"] == "ERROR" and "TrialDiverged: loss is nan" in table.loc[0.7, "error"]
    c, kids, _ = _children(uri, "timevlm-faults")
    by_nc = {r.data.params["model.norm_const"]: r for r in kids}
    assert len(kids) == 3
    survivor = by_nc["0.1"]
    assert survivor.info.status == "FINISHED" and survivor.data.metrics["system/resumed_from_epoch"] >= 1
    assert sorted({m.step for m in c.get_metric_history(survivor.info.run_id, "val_mse")}) == [1, 2, 3, 4, 5, 6]
    nan_run = by_nc["0.7"]
    assert nan_run.info.status == "FAILED" and "loss is nan" in nan_run.data.tags["failure_reason"]
    assert by_nc["1.0"].info.status == "FINISHED"  # the study went on after the NaN trial


def _tune(args, env, **kw):
    return subprocess.Popen([sys.executable, "tune.py", *args], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_driver_killed_mid_study_then_resumed(tmp_path, shared_cache):
    """Two cells x two grid points in one Tuner (a multi-cell grid study), the driver killed after the first
    trial finished, then --resume: nothing lost, nothing re-run, no MLflow run duplicated, both cells' bests."""
    study = _study(tmp_path, "resume", [0.1, 1.0], epochs=3, windows=192, horizons=(24, 12))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--study", str(study), "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
            "--cache-dir", shared_cache]
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = _tune(args, env)
    deadline, finished_before = time.time() + 400, []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            c, kids, _ = _children(uri, "timevlm-resume")
        except Exception:  # noqa: BLE001
            continue
        finished_before = [r for r in kids if r.info.status == "FINISHED"]
        if finished_before:
            break
    assert proc.poll() is None, "the study finished before the driver could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "stop", "--force"], capture_output=True)
    done_ids = {r.data.tags[tracking.TRIAL_TAG] for r in finished_before}
    steps_before = {r.info.run_id: len(c.get_metric_history(r.info.run_id, "val_mse")) for r in finished_before}

    resumed = _tune(args + ["--resume"], env)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-3000:]
    c, kids, runs = _children(uri, "timevlm-resume")
    assert len([r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "study"]) == 1  # parent reused
    assert len(kids) == 4 and all(r.info.status == "FINISHED" for r in kids)  # none lost, none duplicated
    assert sorted(r.data.params["model.pred_len"] for r in kids) == ["12", "12", "24", "24"]
    assert done_ids <= {r.data.tags[tracking.TRIAL_TAG] for r in kids}
    for run_id, n in steps_before.items():  # completed trials were not re-run
        assert len(c.get_metric_history(run_id, "val_mse")) == n
    assert out.count("DONE") >= 4, out[-2000:]
    assert "best on ETTh1-24" in out and "best on ETTh1-12" in out
    # tune.py's local cluster runs no preemption watcher (one machine: nothing to preempt), so Ray's core worker
    # has no watcher actor to log an ERROR about for each trial
    assert "PreemptionWatcher" not in out, out[-2000:]


def test_unreachable_tracking_uri_fails_at_start():
    t0 = time.time()
    r = subprocess.run([sys.executable, "tune.py", "--smoke", "--tracking-uri", "http://127.0.0.1:9"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "MLflow tracking URI 'http://127.0.0.1:9' is not usable" in r.stderr
    assert time.time() - t0 < 60
