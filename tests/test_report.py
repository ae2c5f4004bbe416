"""`tune.py report` on a study whose MLflow runs are written here by hand (known values -> known table)."""
from __future__ import annotations


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
        tracking.log_params(c, rid, params)
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
                         {"best_val_mse": mse + 0.1, "test_mse": mse, "test_mae": mse / 2, "params_total": 1000}))
    c, parent = _study_runs(uri, "nc", rows)
    spec = parse_study({"name": "nc", "search": {"model.norm_const": {"type": "grid", "values": [0.1, 0.4]}},
                        "searcher": "grid", "seeds": 2, "fixed": {"model": {"seq_len": 96}}})
    dest = write_report(spec, uri, str(tmp_path / "reports"))
    md = (dest / "report.md").read_text()
    assert "0.4200" in md and "0.5100" in md  # means over the two seeds
    res = pd.read_csv(dest / "results.csv").set_index("model.norm_const")
    assert res.loc[0.1, "n"] == 2 and res.loc[0.1, "test_mse"] == pytest.approx(0.51)
    assert res.loc[0.4, "test_mse_std"] == pytest.approx(0.0282843, rel=1e-4)
    assert (dest / "sensitivity_norm_const.png").stat().st_size > 10_000
    logged = {a.path for a in c.list_artifacts(parent, "report")}
    assert {"report/report.md", "report/results.csv", "report/sensitivity_norm_const.png"} <= logged


def test_optuna_report_has_importances(tmp_path):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    rows = [({"data.dataset": "ETTh1", "model.pred_len": 96, "searched.model.d_model": dm,
              "searched.model.norm_const": nc},
             {"best_val_mse": 0.3 + 0.001 * dm + 0.01 * nc, "test_mse": 0.4, "test_mae": 0.4})
            for dm in (32, 64, 128) for nc in (0.1, 0.4)]
    _study_runs(uri, "j", rows)
    spec = parse_study({"name": "j", "search": {"model.d_model": {"type": "choice", "values": [32, 64, 128]},
                                                "model.norm_const": {"type": "choice", "values": [0.1, 0.4]}}})
    dest = write_report(spec, uri, str(tmp_path / "r"))
    md = (dest / "report.md").read_text()
    assert "Best configurations" in md and "Parameter importances" in md
    assert (dest / "importances.png").exists()


def test_report_of_a_study_that_never_ran(tmp_path):
    from timevlm.errors import ConfigError

    spec = parse_study({"name": "ghost", "search": {}})
    with pytest.raises(ConfigError, match="no MLflow experiment 'timevlm-ghost'"):
        write_report(spec, f"sqlite:///{tmp_path / 'm.db'}", str(tmp_path))
