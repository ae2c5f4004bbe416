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


def _two_cells_at_once(tmp_path, shared_cache, study, tuners):
    """Run a 2-cell x 1-trial study (ETTh1 at horizons 24 and 12) through `tuners` on the 2-CPU Ray; check both
    cells finished with a best each and that their MLflow runs overlapped in time."""
    study_file = tmp_path / "s.yaml"
    study_file.write_text(yaml.safe_dump(study))
    spec = load_study(str(study_file))
    assert [name for name, _ in spec.tuner_groups()] == tuners
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_study(spec, RunOptions(tracking_uri=uri, storage_path=str(tmp_path / "ray_results"),
                                     cache_dir=shared_cache, verbose=0))
    assert sorted(out["table"]["horizon"]) == [12, 24] and (out["table"]["status"] == "DONE").all()
    assert set(out["best"]) == {"ETTh1-24", "ETTh1-12"}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(f"timevlm-{study['name']}")
    kids = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]]
    a, b = sorted(kids, key=lambda r: r.data.params["model.pred_len"])
    assert (a.data.params["model.pred_len"], b.data.params["model.pred_len"]) == ("12", "24")
    assert a.info.start_time < b.info.end_time and b.info.start_time < a.info.end_time  # ran at the same time
    return out, client, kids


def test_cells_of_a_grid_study_run_at_once_and_utilisation_is_reported(local_ray, tmp_path, shared_cache):
    """Two cells x one trial on a 2-CPU Ray: one Tuner runs both, so their MLflow runs overlap in time; the
    parent run gets the cluster utilisation, and each cell its own best."""
    study = {**STUDY, "name": "e2e-cells", "horizons": [24, 12], "search": {}, "searcher": "grid",
             "budget": {"trials": 1, "epochs": 1}}
    out, client, kids = _two_cells_at_once(tmp_path, shared_cache, study, ["e2e-cells"])
    parent = client.get_run(out["parent_run_id"])
    assert parent.data.metrics["trial_slots"] == 2
    assert 0 < parent.data.metrics["cluster_utilisation"] <= 1
    held = sum(k.info.end_time - k.info.start_time for k in kids) / 1000  # each trial's slot, start to end
    assert parent.data.metrics["trial_seconds_sum"] == pytest.approx(held, rel=1e-3)
    assert parent.data.metrics["cluster_utilisation"] == pytest.approx(
        held / (2 * parent.data.metrics["trials_wall_seconds"]), rel=1e-3)
    assert parent.data.metrics["features_needed"] == 6  # 2 cells x 3 splits, built or found before the trials


def test_prebuild_builds_each_entry_once_and_trials_only_read(local_ray, tmp_path, data_dir):
    import dataclasses

    import numpy as np
    import torch

    from timevlm.experiment import feature_encoder, prepare
    from timevlm.features import FeatureCache
    from timevlm_platform.prebuild import prebuild_features, study_jobs
    from timevlm_platform.study import parse_study

    spec = parse_study({**STUDY, "name": "e2e-prebuild", "horizons": [24, 12], "search": {}, "searcher": "grid",
                        "variants": {"full": {}, "w/o VAL": {"model.use_val": False},
                                     "linear": {"model.model": "dlinear"}}})
    cache = str(tmp_path / "cache")
    jobs, why = study_jobs(spec, str(data_dir))
    assert len(jobs) == 6 and not why  # 2 cells x 3 splits: the variants share features, DLinear needs none
    first = prebuild_features(spec, str(data_dir), cache, progress=False)
    assert (first.needed, first.present, first.built, first.windows) == (6, 0, 6, 6 * 96)
    assert FeatureCache(cache).keys() == {j.key for j in jobs}
    # a trial finds every entry it needs: no VLM loaded, nothing built
    exp = spec.experiment("ETTh1", 12, {"variant": "w/o VAL"})
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, data_dir=str(data_dir)),
                              train=dataclasses.replace(exp.train, cache_dir=cache))
    p = prepare(exp, progress=False)
    assert (p.cache_info["cache_hits"], p.cache_info["cache_builds"]) == (3, 0)
    # and what the batch job stored is the frozen VLM's output for those windows (up to float rounding: the
    # job ran them in batches of up to 256, here in one batch of 5, and CPU convolutions sum in another order)
    direct = feature_encoder(exp, "cpu")(p.splits["val"].inputs(np.arange(5)))
    torch.testing.assert_close(p.features["val"].vision[:5], direct["vision"], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(p.features["val"].text[:5], direct["text"], atol=1e-4, rtol=1e-3)
    again = prebuild_features(spec, str(data_dir), cache, progress=False)  # complete: one listing, no job
    assert (again.present, again.built) == (6, 0)


def test_cells_of_a_searched_study_run_side_by_side(local_ray, tmp_path, shared_cache):
    """An Optuna study keeps one Tuner per cell (its sampler compares one cell's trials), but the cells' Tuners
    run at the same time, so two cells x one trial on a 2-CPU Ray overlap too; each cell gets its best."""
    study = {**STUDY, "name": "e2e-optuna-cells", "horizons": [24, 12], "budget": {"trials": 1, "epochs": 1}}
    _two_cells_at_once(tmp_path, shared_cache, study, ["e2e-optuna-cells-ETTh1-24", "e2e-optuna-cells-ETTh1-12"])
