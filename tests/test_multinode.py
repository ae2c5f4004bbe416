"""A real two-node Ray cluster on one machine (`ray start --head`, `ray start --address`), each node with one
CPU, and a 4-cell study: its features are built up front by actors on both nodes, then all its trials share
the two slots (one per node), keeping the cluster busy (utilisation asserted from the parent run)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO
from timevlm_platform import tracking

pytestmark = pytest.mark.slow
RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def test_a_four_cell_study_keeps_both_nodes_busy(tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    port = "6393"
    study = {"name": "multinode", "datasets": ["ETTh1", "ETTh2"], "horizons": [24, 12],
             "fixed": {"model": {"seq_len": 48, "d_model": 16, "d_fusion": 32}, "data": {"max_windows": 64}},
             "searcher": "grid", "budget": {"trials": 1, "epochs": 1}, "scheduler": {"type": "fifo"},
             "resources": {"workers_per_trial": 1, "cpus_per_worker": 1}}
    f = tmp_path / "multinode.yaml"
    f.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        head = subprocess.run([RAY, "start", "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
                               "--disable-usage-stats"], env=env, capture_output=True, text=True, timeout=120)
        assert head.returncode == 0, head.stderr
        node2 = subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"], env=env,
                               capture_output=True, text=True, timeout=120)
        assert node2.returncode == 0, node2.stderr
        r = subprocess.run([sys.executable, "tune.py", "--study", str(f), "--address", f"127.0.0.1:{port}",
                            "--tracking-uri", uri, "--storage-path", str(tmp_path / "ray"),
                            "--cache-dir", str(tmp_path / "cache")],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "2 concurrent" in r.stdout  # the cluster's 2 CPUs (1 per node) allow two trials at once
        assert "12 feature entries needed, 0 already cached, 12 built (768 windows)" in r.stdout
        assert "on 2 node(s)" in r.stdout  # the batch job's actors ran on both nodes
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("timevlm-multinode")
    runs = c.search_runs([exp.experiment_id])
    kids = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "trial"]
    assert len(kids) == 4 and all(k.info.status == "FINISHED" for k in kids)
    assert len({k.data.tags["ray_node_id"] for k in kids}) == 2  # trials on both nodes
    assert all(k.data.metrics["system/cache_builds"] == 0 for k in kids)  # trials only read the prebuilt features
    parent = next(r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "study")
    print("utilisation", parent.data.metrics["system/cluster_utilisation"], parent.data.metrics)
    assert parent.data.metrics["system/features_build_nodes"] == 2
    assert parent.data.metrics["system/cluster_utilisation"] >= 0.8
