"""A real tiny study: local Ray (repo as working_dir), Optuna, 2 trials x 2 epochs (side by side on the 2 CPUs) on
ETTh1, checked in MLflow afterwards; then the same study resumed (nothing re-run, no duplicate run)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from conftest import REPO
from timevlm.config import DataConfig
from timevlm.data.splits import build_splits
from timevlm_platform import tracking
from timevlm_platform.runner import RunOptions, run_study
from timevlm_platform.search_space import tuner_groups
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
    "budget": {"trials": 2, "epochs": 2},
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


@pytest.fixture(scope="module")
def tiny_study(local_ray, tmp_path_factory, shared_cache):
    """The tiny Optuna study, run once for the tests that check what it left in MLflow (and in a browser)."""
    tmp_path = tmp_path_factory.mktemp("tiny_study")
    study_file = tmp_path / "e2e.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    spec = load_study(str(study_file))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    opts = RunOptions(tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), cache_dir=shared_cache,
                      verbose=0)
    return spec, opts, run_study(spec, opts), tmp_path


def test_tiny_study_logs_every_trial_to_mlflow(tiny_study):
    spec, opts, out, tmp_path = tiny_study
    uri = opts.tracking_uri

    table = out["table"]
    assert len(table) == 2 and (table["status"] == "DONE").all(), table
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("timevlm-e2e")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get(tracking.ROLE_TAG) == "study"]
    children = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]]
    assert len(parents) == 1 and parents[0].info.run_id == out["parent_run_id"]
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
    for c in children:
        p = c.data.params
        assert p["model.seq_len"] == "48" and p["data.dataset"] == "ETTh1" and p["model.pred_len"] == "24"
        # resolved, each once: the dataset's real n_vars and period, nothing logged twice or about paths
        assert p["model.n_vars"] == "7" and p["model.periodicity"] == "24" and "Electricity" in p[
            "model.dataset_description"]
        assert not [k for k in p if k.startswith("searched.") or k in ("train.progress", "data.data_dir")]
        searched = json.loads(c.data.tags[tracking.SEARCHED_TAG])
        assert searched["model.norm_const"] in (0.1, 0.4, 1.0) and p["model.norm_const"] == str(searched[
            "model.norm_const"])
        assert "This trial sets" in c.data.tags["mlflow.note.content"] and "`model.norm_const` =" in c.data.tags[
            "mlflow.note.content"]
        assert c.data.tags["mlflow.source.name"] and c.data.tags.get("mlflow.source.git.commit")
        assert {(d.dataset.name, d.tags[0].value) for d in c.inputs.dataset_inputs} == {
            ("ETTh1-train", "train"), ("ETTh1-val", "val"), ("ETTh1-test", "test")}
        assert c.data.tags[tracking.MODEL_URI_TAG].startswith("models:/")
        hist = client.get_metric_history(c.info.run_id, "val_mse")
        assert [m.step for m in hist] == [1, 2]  # one point per epoch
        # the running best: one curve, steps 1..N, never a summary point at step 0 drawing a V
        best_hist = client.get_metric_history(c.info.run_id, "best_val_mse")
        assert [m.step for m in best_hist] == [1, 2] and best_hist[1].value <= best_hist[0].value
        assert len(client.get_metric_history(c.info.run_id, "train_loss")) == 2
        assert {"test_mse", "test_mae", "system/params_total", "system/seconds"} <= set(c.data.metrics)
        assert {a.path for a in client.list_artifacts(c.info.run_id)} == {"plots"}
    best = [c for c in children if c.data.tags.get(tracking.BEST_TAG) == "true"]
    assert len(best) == 1
    assert best[0].data.metrics["best_val_mse"] == min(c.data.metrics["best_val_mse"] for c in children)
    assert parents[0].data.tags["best.ETTh1.24.run_id"] == best[0].info.run_id
    assert best[0].info.run_name.startswith("[best] ")  # marked where the runs table shows it (names are cut)
    assert not any("[best]" in c.info.run_name for c in children if c is not best[0])
    # the study's row carries the best trial's values under its own names, so it never ties with that trial
    for k in ("best_val_mse", "test_mse", "test_mae"):
        assert parents[0].data.metrics[f"study/{k}"] == pytest.approx(best[0].data.metrics[k])
        assert k not in parents[0].data.metrics
    # the selection gap is a labelled diagnostic beside the validation choice, which alone made `@best` above
    test_choice = min(c.data.metrics["test_mse"] for c in children)
    assert parents[0].data.metrics["diagnostic/test_selected_test_mse"] == pytest.approx(test_choice)
    assert parents[0].data.metrics["diagnostic/selection_gap_pct"] == pytest.approx(
        100 * (best[0].data.metrics["test_mse"] - test_choice) / test_choice)
    assert "selection_gap.csv" in {a.path for a in client.list_artifacts(out["parent_run_id"])}
    assert client.get_experiment(exp.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    # Optuna really sampled, and no configuration was handed out twice
    assert len({c.data.tags[tracking.SEARCHED_TAG] for c in children}) == 2
    # ... and its study is in the SQLite file beside the MLflow store, every finished trial told
    study = optuna.load_study(study_name="timevlm-e2e/e2e-ETTh1-24", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.get_trials(states=[optuna.trial.TrialState.COMPLETE])) == 2
    assert study.best_value == pytest.approx(best[0].data.metrics["best_val_mse"])
    # what optuna-dashboard shows: the objective by name, one point per epoch, and the link to each MLflow run
    assert study.metric_names == ["best_val_mse"]
    # (the trials Optuna drew twice are told FAIL and never ran: only the completed ones have runs)
    complete = study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert {t.user_attrs["mlflow_run_id"] for t in complete} == {c.info.run_id for c in children}
    assert all(sorted(t.intermediate_values) == [1, 2] for t in complete)

    # the best trial's model is registered; loaded as a pyfunc it forecasts raw test windows, and its error
    # on every test window is the trial's logged test MSE
    mv = client.get_model_version_by_alias("timevlm-e2e-ETTh1-24", "best")
    assert mv.run_id == best[0].info.run_id and float(mv.tags["test_mse"]) == pytest.approx(
        best[0].data.metrics["test_mse"])
    # ... from its logged model, which is named after the trial, carries its parameters and test metrics, and
    # links back to the version (what its page in the UI shows)
    logged = client.get_logged_model(best[0].data.tags[tracking.MODEL_URI_TAG].removeprefix("models:/"))
    assert mv.source == f"models:/{logged.model_id}" and logged.name.startswith("ETTh1-24_")
    assert f"_norm_const-{float(best[0].data.params['model.norm_const']):g}_".replace(".", "p") in logged.name
    assert logged.params["model.norm_const"] == best[0].data.params["model.norm_const"]
    assert {m.key: m.value for m in logged.metrics}["test_mse"] == pytest.approx(best[0].data.metrics["test_mse"])
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "timevlm-e2e-ETTh1-24",
                                                                "version": int(mv.version)}]
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model("models:/timevlm-e2e-ETTh1-24@best")
    test = build_splits(DataConfig(dataset="ETTh1", max_windows=96), 48, 24)["test"]
    idx = np.arange(len(test))
    pred = model.predict(test.scaler.inverse(test.inputs(idx).numpy()).astype(np.float32))
    true = np.stack([test.window(int(i))[1] for i in idx])
    assert pred.shape == (len(test), 24, 7)
    assert np.mean((test.scaler.transform(pred.reshape(-1, 7)).reshape(pred.shape) - true) ** 2) == pytest.approx(
        best[0].data.metrics["test_mse"], rel=1e-3)

    # resuming a finished study re-runs nothing and makes no new MLflow runs or model versions
    again = run_study(spec, RunOptions(**{**opts.__dict__, "resume": True}))
    assert len(again["table"]) == 2 and again["parent_run_id"] == out["parent_run_id"]
    assert len(client.search_runs([exp.experiment_id])) == len(runs)
    assert [str(v.version) for v in client.search_model_versions("name = 'timevlm-e2e-ETTh1-24'")] == ["1"]


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
    children = {c.data.params["variant"]: c for c in client.search_runs([exp.experiment_id])
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
    assert [name for name, _ in tuner_groups(spec)] == tuners
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
    assert parent.data.metrics["system/trial_slots"] == 2
    assert 0 < parent.data.metrics["system/cluster_utilisation"] <= 1
    held = sum(k.info.end_time - k.info.start_time for k in kids) / 1000  # each trial's slot, start to end
    assert parent.data.metrics["system/trial_seconds_sum"] == pytest.approx(held, rel=1e-3)
    assert parent.data.metrics["system/cluster_utilisation"] == pytest.approx(
        held / (2 * parent.data.metrics["system/trials_wall_seconds"]), rel=1e-3)
    assert parent.data.metrics["system/features_needed"] == 6  # 2 cells x 3 splits, built or found before the trials


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


def test_data_parallel_trial_trains_one_model_on_disjoint_shards(local_ray, tmp_path, shared_cache):
    """`workers_per_trial: 2`: one trial, two Ray Train workers (DDP over gloo on this CPU). The ranks saw
    disjoint halves of the training windows, ended with identical weights, and MLflow got one run with one
    metric point per epoch (rank 1 logs nothing)."""
    study = {**STUDY, "name": "e2e-ddp", "search": {}, "searcher": "grid", "budget": {"trials": 1, "epochs": 2},
             "resources": {"workers_per_trial": 2, "cpus_per_worker": 1}}
    study_file = tmp_path / "ddp.yaml"
    study_file.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_study(load_study(str(study_file)), RunOptions(
        tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), cache_dir=shared_cache, verbose=0))
    assert (out["table"]["status"] == "DONE").all() and len(out["table"]) == 1
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("timevlm-e2e-ddp")
    kids = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]]
    assert len(kids) == 1
    run = kids[0]
    local = client.download_artifacts(run.info.run_id, "data_parallel.json", str(tmp_path))
    ranks = json.loads(open(local).read())
    assert [r["rank"] for r in ranks] == [0, 1]
    a, b = (set(r["train_windows"]) for r in ranks)
    assert a and len(a) == len(b) and not a & b  # disjoint shards of equal size
    train = build_splits(DataConfig(dataset="ETTh1", max_windows=96), 48, 24)["train"]
    assert a | b <= set(train.starts.tolist()) and len(a | b) == len(train) // 2 * 2
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]  # one model, kept identical by DDP
    assert run.data.tags["data_parallel.weights_identical"] == "True"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_mse")] == [1, 2]
    assert "test_mse" in run.data.metrics


def test_mlflow_ui_in_a_real_browser_shows_the_study(tiny_study, tmp_path):
    """The tiny study's store served by a real `mlflow server`, opened in headless Chromium at the link tune.py
    prints: the experiment's runs with the study's columns, sorted by validation MSE with the best trial first
    and marked, the study's run after its trials; the chart view opens on the search; the registered model and a
    trial's forecast plot render."""
    from browser import chromium_page, why_no_browser
    from mlflow_server import mlflow_server

    if why := why_no_browser():
        pytest.skip(why)
    spec, opts, out, _ = tiny_study
    client = MlflowClient(opts.tracking_uri)
    kids = [r for r in client.search_runs([out["experiment_id"]])
            if r.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]]
    # TIMEVLM_UI_SCREENSHOTS=reports/mlflow-ui keeps the screenshots (the README's pictures come from here)
    shots = Path(os.environ.get("TIMEVLM_UI_SCREENSHOTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    # wide enough for every column: the runs table renders only the columns in view
    with mlflow_server(opts.tracking_uri, tmp_path / "server.log") as base, chromium_page(2600) as page:
        page.goto(tracking.experiment_url(base, out["experiment_id"]))
        # the link opens on the trials sorted by validation MSE: the best one (marked) first, the study's run last
        order = sorted(kids, key=lambda k: k.data.metrics["best_val_mse"])
        assert order[0].info.run_name.startswith("[best] ")
        rows = {}
        for run in order + [r for r in client.search_runs([out["experiment_id"]])
                            if r.info.run_id == out["parent_run_id"]]:
            link = page.get_by_role("link", name=run.info.run_name, exact=True).first
            link.wait_for()
            rows[run.info.run_name] = int(link.locator("xpath=ancestor::div[@role='row']").first.get_attribute(
                "row-index"))
        assert list(rows) == sorted(rows, key=rows.get), rows
        for column in ("metrics.`best_val_mse`", "metrics.`test_mse`", "params.`model.norm_const`"):  # the view's
            page.locator(f"[role=columnheader][col-id='{column}']").first.wait_for()
        page.screenshot(path=str(shots / "runs.png"))
        # the chart view opens on the search: the searched parameters against the selection metric, then the
        # validation and training curves, before the sections MLflow makes for the other metrics
        page.goto(tracking.experiment_url(base, out["experiment_id"]) + "&compareRunsMode=CHART")
        section = f"Search: {', '.join(spec.searched_keys)} against {spec.metric}"
        page.get_by_text(section[:30]).first.wait_for()
        page.get_by_text("Parallel Coordinates").first.wait_for()
        page.get_by_text("Model metrics").first.wait_for()
        body = page.inner_text("body")
        first = body.index(section[:30])  # the chart sections, in page order, start with the search's
        titles = [body.index(t, first) for t in ("Parallel Coordinates", "\nval_mse\n", "\ntrain_loss\n",
                                                  "Model metrics")]  # the charts' titles, each on its line
        assert titles == sorted(titles), titles
        assert "Model metrics" not in body[:first]
        page.screenshot(path=str(shots / "charts.png"))

        page.goto(f"{base}/#/models/timevlm-e2e-ETTh1-24")
        page.get_by_text("Version 1").first.wait_for()
        page.get_by_text("best").first.wait_for()  # the alias
        page.screenshot(path=str(shots / "registered_model.png"))

        best = next(k for k in kids if k.data.tags.get(tracking.BEST_TAG) == "true")
        # the best trial's logged model page names its registered version (the model and the registry are linked)
        model_id = best.data.tags[tracking.MODEL_URI_TAG].removeprefix("models:/")
        page.goto(f"{base}/#/experiments/{out['experiment_id']}/models/{model_id}?workflowType=machine_learning")
        page.get_by_text("timevlm-e2e-ETTh1-24").first.wait_for()
        page.screenshot(path=str(shots / "logged_model.png"))

        page.goto(f"{base}/#/experiments/{out['experiment_id']}/runs/{best.info.run_id}/artifacts/plots/"
                  "forecast_test.png?workflowType=machine_learning")
        img = page.locator("img[src*='forecast_test.png'], img[src^='blob:']").first
        img.wait_for()
        page.wait_for_function("img => img.complete && img.naturalWidth > 200", arg=img.element_handle())
        page.screenshot(path=str(shots / "forecast_plot.png"))


def test_trials_after_an_asha_stop_run_to_their_end(local_ray, tmp_path, shared_cache):
    """ASHA stops trials mid-way. A stopped trial's driver stays blocked in its TorchTrainer for a while, so its
    process must not be handed to the next trial (Tune's reuse would time out and fail that trial): every
    trial ends DONE or STOPPED, none ERROR, and every one has its MLflow run."""
    study = {**STUDY, "name": "e2e-asha", "budget": {"trials": 4, "epochs": 3},
             "scheduler": {"type": "asha", "grace_period": 1, "reduction_factor": 2}}
    study_file = tmp_path / "asha.yaml"
    study_file.write_text(yaml.safe_dump(study))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = run_study(load_study(str(study_file)), RunOptions(
        tracking_uri=uri, storage_path=str(tmp_path / "ray_results"), cache_dir=shared_cache, verbose=0))
    table = out["table"]
    if not (table["status"] == "STOPPED").any():
        pytest.skip(f"ASHA stopped no trial on this run, so no process was up for reuse:\n{table}")
    assert len(table) == 4 and set(table["status"]) <= {"DONE", "STOPPED"}, table.to_string()
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("timevlm-e2e-asha")
    kids = [r for r in client.search_runs([exp.experiment_id])
            if r.data.tags.get(tracking.PARENT_TAG) == out["parent_run_id"]]
    states = {r.info.run_name: (r.info.status, r.data.tags.get("failure_reason"), r.data.tags.get(tracking.OUTCOME_TAG))
              for r in kids}
    assert len(kids) == 4 and all(s == "FINISHED" for s, _, _ in states.values()), f"{states}\n{table}"
    # each trial Tune reports STOPPED, and only those, is named stopped in MLflow
    assert sum(o is not None for _, _, o in states.values()) == (table["status"] == "STOPPED").sum(), states
    # ... and is PRUNED in Optuna (Ray's own searcher tells it COMPLETE), with no point past its last epoch
    study = optuna.load_study(study_name="timevlm-e2e-asha/e2e-asha-ETTh1-24",
                              storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    by_state = {st: sum(t.state == st for t in study.trials) for st in optuna.trial.TrialState}
    assert by_state[optuna.trial.TrialState.PRUNED] == (table["status"] == "STOPPED").sum()
    assert by_state[optuna.trial.TrialState.COMPLETE] == (table["status"] == "DONE").sum()
    assert all(max(t.intermediate_values) <= 3 for t in study.trials if t.intermediate_values)
