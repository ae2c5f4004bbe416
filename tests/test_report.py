"""`tune.py report` on a study whose MLflow runs are written here by hand (known values -> known table)."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from timevlm_platform import tracking
from timevlm_platform.report import write_report
from timevlm_platform.study import parse_study


def _study_runs(uri, name, rows):
    c = MlflowClient(uri)
    exp = c.create_experiment(f"timevlm-{name}")
    parent = tracking.parent_run(c, exp, name, False, {})
    for i, (params, metrics) in enumerate(rows):
        rid = tracking.child_run(c, exp, parent, f"t{i}", f"t{i}", {})
        searched = {k[len("searched."):]: v for k, v in params.items() if k.startswith("searched.")}
        tracking.log_params(c, rid, {k: v for k, v in params.items() if not k.startswith("searched.")})
        tracking.set_tags(c, rid, {tracking.SEARCHED_TAG: json.dumps(searched)})
        tracking.log_metrics(c, rid, metrics)
        tracking.finish(c, rid, True)
    return c, parent


def test_sensitivity_report_with_seeds(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rows = []
    for nc, mses in ((0.1, (0.50, 0.52)), (0.4, (0.40, 0.44))):
        for seed, mse in zip((1, 2), mses):
            rows.append(({"data.dataset": "ETTh1", "model.pred_len": 96, "model.model": "timevlm", "train.seed": seed,
                          "searched.model.norm_const": nc, "searched.train.seed": seed},
                         {"best_val_mse": mse + 0.1, "test_mse": mse, "test_mae": mse / 2, "system/params_total": 1000}))
    c, parent = _study_runs(uri, "nc", rows)
    spec = parse_study({"name": "nc", "search": {"model.norm_const": {"type": "grid", "values": [0.1, 0.4]}},
                        "searcher": "grid", "seeds": 2, "fixed": {"model": {"seq_len": 96}}})
    dest = write_report(spec, uri, str(tmp_path / "reports"))
    md = (dest / "report.md").read_text()
    assert "0.4200" in md and "0.5100" in md  # means over the two seeds
    res = pd.read_csv(dest / "results.csv").set_index("model.norm_const")
    assert res.loc[0.1, "n"] == 2 and res.loc[0.1, "test_mse"] == pytest.approx(0.51)
    assert res.loc[0.4, "test_mse_std"] == pytest.approx(0.0282843, rel=1e-4)
    assert res.loc[0.1, "params"] == 1000  # read from the operational `system/` metric
    assert (dest / "sensitivity_norm_const.png").stat().st_size > 10_000
    logged = {a.path for a in c.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/results.csv", "report/sensitivity_norm_const.png"} <= logged


def _optuna_study(storage, name, rows):
    import optuna
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(study_name=name, storage=storage)
    dists = {"model.d_model": CategoricalDistribution([32, 64, 128]), "model.norm_const": CategoricalDistribution(
        [0.1, 0.4])}
    for params, value in rows:
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=value))
    return study


@pytest.mark.parametrize("repeats", [1, 4])
def test_optuna_report_importances_are_the_dashboards_with_a_caveat_below_the_minimum(tmp_path, repeats):
    """One source: Optuna's own study, PED-ANOVA (what optuna-dashboard computes), not a second estimate from the
    MLflow runs; with 6 trials the report says they cannot carry importances, with 24 it plots them."""
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator

    uri, storage = f"sqlite:///{tmp_path / 'm.db'}", f"sqlite:///{tmp_path / 'optuna.db'}"
    grid = [(dm, nc) for dm in (32, 64, 128) for nc in (0.1, 0.4)] * repeats
    values = [0.3 + 0.001 * dm + 0.01 * nc + 0.0001 * i for i, (dm, nc) in enumerate(grid)]
    _study_runs(uri, "j", [({"data.dataset": "ETTh1", "model.pred_len": 96, "searched.model.d_model": dm,
                             "searched.model.norm_const": nc}, {"best_val_mse": v, "test_mse": 0.4, "test_mae": 0.4})
                           for (dm, nc), v in zip(grid, values)])
    study = _optuna_study(storage, "timevlm-j/j-ETTh1-96", [({"model.d_model": dm, "model.norm_const": nc}, v)
                                                            for (dm, nc), v in zip(grid, values)])
    spec = parse_study({"name": "j", "search": {"model.d_model": {"type": "choice", "values": [32, 64, 128]},
                                                "model.norm_const": {"type": "choice", "values": [0.1, 0.4]}}})
    dest = write_report(spec, uri, str(tmp_path / "r"), optuna_storage=storage)
    md = (dest / "report.md").read_text()
    assert "Best configurations" in md and "Parameter importances, ETTh1-96" in md
    want = optuna.importance.get_param_importances(study, target=lambda t: t.values[0],
                                                   evaluator=PedAnovaImportanceEvaluator())
    for name, value in want.items():
        assert f"| {name} " in md and f"{value:.3f}" in md
    few = len(grid) < 20
    assert ("too few for importances to mean anything" in md) == few
    assert (dest / "importances_ETTh1-96.png").exists() == (not few)


def test_selection_gap_sets_the_test_choice_beside_the_validation_choice():
    """Configurations are seed means; a trial without a test figure (stopped) is neither choice; cells apart."""
    from timevlm_platform.selection import selection_gap

    rows = [("ETTh1", 96, 32, 1, 0.50, 0.42), ("ETTh1", 96, 32, 2, 0.52, 0.44),  # val-best: test 0.43
            ("ETTh1", 96, 64, 1, 0.60, 0.40), ("ETTh1", 96, 64, 2, 0.62, 0.40),  # test-best: 0.40
            ("ETTh1", 96, 128, 1, 0.10, None),                                   # stopped: lowest val, no test
            ("ETTh1", 720, 32, 1, 0.90, 0.70), ("ETTh1", 720, 64, 1, 0.95, 0.75)]  # val and test agree
    df = pd.DataFrame(rows, columns=["dataset", "horizon", "d_model", "seed", "best_val_mse", "test_mse"])
    gap = selection_gap(df, ["d_model"]).set_index("horizon")
    assert gap.loc[96, "val_selected"] == "d_model=32" and gap.loc[96, "test_selected"] == "d_model=64"
    assert gap.loc[96, "val_selected_test_mse"] == pytest.approx(0.43)
    assert gap.loc[96, "selection_gap_pct"] == pytest.approx(7.5) and gap.loc[96, "configs"] == 2
    assert gap.loc[720, "selection_gap_pct"] == 0.0


def test_report_prints_the_selection_gap_as_a_diagnostic(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rows = [({"data.dataset": "ETTh1", "model.pred_len": 96, "model.model": "timevlm", "searched.model.d_model": dm},
             {"best_val_mse": val, "test_mse": test, "test_mae": test})
            for dm, val, test in ((32, 0.5, 0.44), (64, 0.6, 0.40))]
    rows.append(({"data.dataset": "ETTh1", "model.pred_len": 96, "model.model": "timevlm",  # stopped by ASHA
                  "searched.model.d_model": 16}, {"best_val_mse": 0.9}))
    _study_runs(uri, "g", rows)
    spec = parse_study({"name": "g", "search": {"model.d_model": {"type": "grid", "values": [16, 32, 64]}},
                        "searcher": "grid"})
    dest = write_report(spec, uri, str(tmp_path / "r"))
    md = (dest / "report.md").read_text()
    assert "## Selection gap (diagnostic, not a result)" in md and "+10.0" in md
    # the stopped trial has its row (validation only); one seed: no empty std columns; no paper column, no
    # paragraph about paper columns
    res = pd.read_csv(dest / "results.csv").set_index("model.d_model")
    assert res.loc[16, "stopped"] == 1 and res.loc[16, "val_mse"] == 0.9 and pd.isna(res.loc[16, "test_mse"])
    assert "1 of them stopped early by the scheduler" in md
    assert "_std" not in md and "paper_" not in md and "one run per configuration" in md
    gap = pd.read_csv(dest / "selection_gap.csv")
    assert gap.loc[0, "val_selected_test_mse"] == pytest.approx(0.44)
    assert gap.loc[0, "test_selected_test_mse"] == pytest.approx(0.40)


def test_report_of_a_study_that_never_ran(tmp_path):
    from timevlm.errors import ConfigError

    spec = parse_study({"name": "ghost", "search": {}})
    with pytest.raises(ConfigError, match="no MLflow experiment 'timevlm-ghost'"):
        write_report(spec, f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path))


def test_ablation_report_prints_change_against_full_and_the_paper_beside_ours(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    mses = {"full": (0.36, 0.38), "w/o VAL": (0.40, 0.40), "w/o TAL": (0.37, 0.37)}
    rows = [({"data.dataset": "ETTh1", "model.pred_len": 96, "model.model": "timevlm", "train.seed": seed,
              "model.seq_len": 512, "searched.variant": variant, "searched.train.seed": seed},
             {"best_val_mse": mse + 0.3, "test_mse": mse, "test_mae": mse + 0.05})
            for variant, pair in mses.items() for seed, mse in zip((1, 2), pair)]
    _study_runs(uri, "abl", rows)
    spec = parse_study({"name": "abl", "searcher": "grid", "seeds": 2, "fixed": {"model": {"seq_len": 512}},
                        "variants": {"full": {}, "w/o VAL": {"model.use_val": False},
                                     "w/o TAL": {"model.use_tal": False}}})
    dest = write_report(spec, uri, str(tmp_path / "reports"))
    abl = pd.read_csv(dest / "ablation.csv").set_index("variant")
    assert abl.loc["full", "mse_change_pct"] == 0
    assert abl.loc["w/o VAL", "mse_change_pct"] == pytest.approx(100 * (0.40 - 0.37) / 0.37)
    assert abl.loc["w/o VAL", "mae_change_pct"] == pytest.approx(100 * (0.45 - 0.42) / 0.42)
    # full's seed spread (std 0.0141) is larger than w/o TAL's change (0.00) but not than w/o VAL's (0.03)
    assert bool(abl.loc["w/o VAL", "beyond_seed_spread"]) and not bool(abl.loc["w/o TAL", "beyond_seed_spread"])
    md = (dest / "report.md").read_text()
    assert "Ablation (change against `full`" in md and "+8.1" in md
    # the paper's ETTh1 96 figure (Table 5: 0.361, at seq_len 512) beside the full model's row, with our
    # difference in %; the ablated variants have no published figure here and get empty cells, not "nan"
    assert "paper_mse" in md and "0.3610" in md and f"{100 * (0.37 - 0.361) / 0.361:+.1f}" in md
    assert "nan" not in md
    res = pd.read_csv(dest / "results.csv")
    assert res["seq_len"].tolist() == [512, 512, 512]


def test_paper_figures_match_only_at_their_input_length():
    from timevlm_platform.paper import beside_paper

    t = pd.DataFrame({"dataset": ["ETTh1"] * 3, "horizon": [96, 96, "avg"], "model": ["timevlm"] * 2 + ["dlinear"],
                      "seq_len": [96, 512, 336], "test_mse": [0.38, 0.37, 0.43]})
    out = beside_paper(t, "long_term")
    assert pd.isna(out.loc[0, "paper_mse"]) and out.loc[1, "paper_mse"] == 0.361
    assert out.loc[2, "paper_mse"] == 0.422  # the baseline's lookback is not stated: matched on the rest


def test_paper_results_are_checked_data():
    from timevlm_platform.paper import paper_results

    df = paper_results()
    row = df[(df["dataset"] == "ETTh1") & (df["horizon"] == "96") & (df["model"] == "timevlm")]
    assert row["value"].tolist() == [0.361] and row["table"].tolist() == ["Table 5"]
    assert set(df["protocol"]) == {"long_term", "few_shot", "zero_shot", "short_term", "efficiency"}
    assert set(df["table"]) == {f"Table {i}" for i in range(1, 9)} and len(df) == 785


@pytest.mark.parametrize("protocol, metric, fields, value, table", [
    ("few_shot", "mse", dict(dataset="ETTh1", percent=10, horizon="avg", model="timevlm"), 0.431, "Table 2"),
    ("few_shot", "mse", dict(dataset="ETTm1", percent=5, horizon="avg", model="timevlm"), 0.364, "Table 1"),
    ("few_shot", "mse", dict(dataset="ETTh1", percent=10, horizon="avg", model="dlinear"), 0.691, "Table 2"),
    ("zero_shot", "mse", dict(dataset="ETTh1", source="ETTh2", horizon="avg", model="timevlm"), 0.496, "Table 3"),
    ("zero_shot", "mae", dict(dataset="ETTm1", source="ETTm2", horizon="avg", model="patchtst"), 0.492, "Table 3"),
    ("short_term", "owa", dict(dataset="M4", horizon="avg", model="timevlm"), 0.855, "Table 4"),
    ("short_term", "owa", dict(dataset="M4-Hourly", horizon=48, model="timevlm"), None, None),
    ("few_shot", "mse", dict(dataset="Weather", percent=10, horizon=96, model="timevlm", variant="w/o VAL"), 0.213,
     "Table 6"),
    # Table 8 names its VLM: a CLIP row gets it, any other row on ETTh2 gets Table 5's figure
    ("long_term", "mse", dict(dataset="ETTh2", percent=100, horizon="avg", model="timevlm", vlm="clip",
                              seq_len=512), 0.339, "Table 8"),
    ("long_term", "mse", dict(dataset="ETTh2", percent=100, horizon="avg", model="timevlm", vlm="custom",
                              seq_len=512), 0.348, "Table 8"),
    ("long_term", "mse", dict(dataset="ETTh2", percent=100, horizon="avg", model="timevlm", seq_len=512), 0.341,
     "Table 5"),
    ("long_term", "params_m", dict(dataset="ETTh1", horizon="avg", model="timevlm"), 143.6, "Table 7"),
    ("few_shot", "mse", dict(dataset="ETTh1", percent=7, horizon="avg", model="timevlm"), None, None),
])
def test_published_values_are_found_by_their_setting(protocol, metric, fields, value, table):
    from timevlm_platform.paper import published

    got = published(protocol, metric, **fields)
    assert got == (None if value is None else (value, table))


def test_few_shot_and_zero_shot_rows_get_their_own_published_figure():
    from timevlm_platform.paper import beside_paper

    few = pd.DataFrame({"dataset": ["ETTh1", "ETTh1"], "percent": [5, 10], "horizon": ["avg", "avg"],
                        "model": ["timevlm", "timevlm"], "test_mse": [0.45, 0.45], "test_mae": [0.44, 0.44]})
    out = beside_paper(few, "few_shot")
    assert out["paper_mse"].tolist() == [0.442, 0.431] and out["paper_table"].tolist() == ["Table 1", "Table 2"]
    assert out.loc[1, "delta_mse_pct"] == pytest.approx(100 * (0.45 - 0.431) / 0.431)
    zero = pd.DataFrame({"dataset": ["ETTh1"], "source": ["ETTh2"], "horizon": ["avg"], "model": ["dlinear"],
                         "test_mse": [0.5]})
    assert beside_paper(zero, "zero_shot")["paper_mse"].tolist() == [0.703]


def test_vlm_report_puts_table_8_beside_ours_and_lists_the_variants_not_run(tmp_path):
    """The VLM study on ETTh2 (Table 8's setting): the custom VLM's averages over horizons beside the paper's,
    with parameters, memory and s/iter; the variants skipped for missing weights listed with Table 8's figures."""
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rows = [({"data.dataset": "ETTh2", "data.test_dataset": None, "model.pred_len": h, "model.seq_len": 512,
              "model.model": "timevlm", "train.batch_size": 32, "searched.model.vlm": "custom"},
             {"best_val_mse": 0.3, "test_mse": mse, "test_mae": 0.4, "system/params_total": 2e6,
              "system/seconds": 64.0, "system/n_train_windows": 8000 + 31, "system/peak_mem_mb": 900})
            for h, mse in ((96, 0.30), (192, 0.34), (336, 0.36), (720, 0.40))]
    c, parent = _study_runs(uri, "vlm", rows)
    tracking.set_tags(c, parent, {tracking.SKIPPED_TAG: json.dumps({v: f"VLM '{v}' is not available (hub default): "
                                                                     "OSError: no weights" for v in ("vilt", "clip")})})
    spec = parse_study({"name": "vlm", "datasets": ["ETTh2"], "horizons": [96, 192, 336, 720], "searcher": "grid",
                        "search": {"model.vlm": {"type": "grid", "values": ["custom", "vilt", "clip"]}},
                        "unavailable_vlms": "skip", "fixed": {"model": {"seq_len": 512}}})
    md = (write_report(spec, uri, str(tmp_path / "reports")) / "report.md").read_text()
    averaged = md.split("## Averaged over horizons")[1].split("##")[0]
    assert "0.3500" in averaged and "0.348" in averaged  # ours (mean of four) beside Table 8's custom row
    assert "0.256" in averaged  # s/iter: 64 s over 250 full batches of 32
    assert " 0.17 " in averaged  # Table 8's s/iter for the custom VLM (printed as the paper prints it)
    not_run = md.split("## Not run here")[1]
    assert "vilt, clip: OSError: no weights" in not_run  # one reason, both named
    assert "vilt" in not_run and "0.336" in not_run and "128.9" in not_run  # Table 8's ViLT row
