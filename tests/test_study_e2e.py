"""A real tiny study: local Ray (repo as working_dir), Optuna, 3 trials x 2 epochs on ETTh1, checked in MLflow
afterwards; then the same study resumed (nothing re-run, no duplicate run)."""
from __future__ import annotations

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO
from timevlm_platform import tracking
from timevlm_platform.runner import RunOptions, run_study
from timevlm_platform.study import load_study

pytestmark = pytest.mark.slow

STUDY = {
    "name": "e2e",
    "datasets": ["ETTh1"], "horizons": [24],
    "fixed": {"model": {"seq_len": 48, "memory_size": 8}, "data": {"max_windows": 96},
              "train": {"batch_size": 32}},
    "search": {"model.norm_const": {"type": "choice", "values": [0.1, 0.4, 1.0]},
               "model.d_model": {"type": "choice", "values": [16, 32]},
               "model.d_fusion": {"type": "choice", "values": [32, 64]}},
    "budget": {"trials": 3, "epochs": 2},
    "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
    "scheduler": {"type": "fifo"},
    "seed": 7,
}


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"working_dir": str(REPO)})
    yield
    ray.shutdown()


def test_ray_workers_with_the_repo_as_working_dir_see_the_stdlib_platform(local_ray):
    @ray.remote
    def probe():
        import os as _os
        import platform

        import torch  # noqa: F401  (would break if `platform` were shadowed)

        return platform.system(), platform.__file__, _os.path.isdir("platform")

    system, path, has_folder = ray.get(probe.remote())
    assert system and "site-packages" not in path and "/platform/" not in path
    assert has_folder  # the worker really runs inside the repository copy


def test_tiny_study_logs_every_trial_to_mlflow(local_ray, tmp_path, shared_cache):
    study_file = tmp_path / "e2e.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    spec = load_study(str(study_file))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opts = RunOptions(tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), cache_dir=shared_cache,
                      verbose=0)
    out = run_study(spec, opts)

    table = out["table"]
    assert len(table) == 3 and (table["status"] == "DONE").all(), table
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("timevlm-e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "study"]
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]]
    assert len(parents) == 1 and parents[0].info.run_id == out["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        p = c.data.params
        assert p["model.seq_len"] == "48" and p["data.dataset"] == "ETTh1" and p["model.pred_len"] == "24"
        assert p["searched.model.norm_const"] in ("0.1", "0.4", "1.0")
        hist = client.get_metric_history(c.info.run_id, "val_mse")
        assert [m.step for m in hist] == [1, 2]  # one point per epoch
        assert len(client.get_metric_history(c.info.run_id, "train_loss")) == 2
        assert {"test_mse", "test_mae", "params_total"} <= set(c.data.metrics)
        arts = {a.path for a in client.list_artifacts(c.info.run_id)}
        assert {"model", "plots"} <= arts
    best = [c for c in children if c.data.tags.get(tracking.BEST_TAG) == "true"]
    assert len(best) == 1
    assert best[0].data.metrics["best_val_mse"] == min(c.data.metrics["best_val_mse"] for c in children)
    assert parents[0].data.tags["best.ETTh1.24.run_id"] == best[0].info.run_id
    # Optuna really sampled, and no configuration was handed out twice
    assert len({tuple(sorted(c.data.params[k] for k in c.data.params if k.startswith("searched."))) for c in children}) == 3

    # resuming a finished study re-runs nothing and makes no new MLflow runs
    again = run_study(spec, RunOptions(**{**opts.__dict__, "resume": True}))
    assert len(again["table"]) == 3 and again["parent_run_id"] == out["parent_run_id"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)


def test_variant_study_runs_each_variant_with_its_settings(local_ray, tmp_path, shared_cache):
    """Named variants (the ablation study's mechanism) reach the trials: one run per variant, each with its
    switch in its resolved parameters, and the Time-VLM residual's validation choice logged per epoch."""
    study = {**STUDY, "name": "e2e-variants", "search": {}, "searcher": "grid", "budget": {"trials": 1, "epochs": 1},
             "variants": {"full": {}, "w/o VAL": {"model.use_val": False}}}
    study_file = tmp_path / "v.yaml"
    study_file.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_study(load_study(str(study_file)), RunOptions(
        tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), cache_dir=shared_cache, verbose=0))
    assert sorted(out["table"]["variant"]) == ["full", "w/o VAL"] and (out["table"]["status"] == "DONE").all()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("timevlm-e2e-variants")
    children = {c.data.params["searched.variant"]: c for c in client.search_runs([exp.experiment_id])
                if c.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]}
    assert children["full"].data.params["model.use_val"] == "True"
    assert children["w/o VAL"].data.params["model.use_val"] == "False"
    assert children["full"].data.metrics["residual_scale"] in (0.0, 1.0)
