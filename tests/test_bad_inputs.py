"""Bad input through the user's entry point (`tune.py`): each gets exit code 2 and an error naming the problem,
before Ray starts or any MLflow run is made. The table in the issue's closing note comes from these cases."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import ett_frame
from timevlm_platform.cli import main

BASE = {"name": "bad", "datasets": ["ETTh1"], "horizons": [96], "fixed": {"model": {"seq_len": 96}},
        "search": {"model.d_model": {"type": "choice", "values": [32, 64]}}, "budget": {"trials": 1, "epochs": 1}}


def _wrong_columns(df):
    return df.rename(columns={"OT": "oil_temp"})


def _nan(df):
    df.loc[500, "MULL"] = np.nan
    return df


CASES = {
    "missing data file": (None, {}, r"ETTh1.csv: data file for ETTh1 not found; set \$TIMEVLM_DATA_DIR"),
    "wrong columns": (_wrong_columns, {}, r"ETTh1.csv: missing column\(s\) \['OT'\] expected for ETTh1"),
    "NaN values": (_nan, {}, r"ETTh1.csv: 1 NaN/inf value\(s\), first at data row 501 column 'MULL'"),
    "series shorter than the protocol": (lambda df: df.iloc[:9000], {},
                                         r"ETTh1.csv: 9000 rows, but the ETTh1 protocol needs 14400 rows"),
    "seq_len + pred_len longer than a split": ("ok", {"horizons": [3000]},
                                               r"\(val split\): 2976 rows, too short for seq_len 96 \+ pred_len 3000"),
    "unknown dataset": ("ok", {"datasets": ["ETTh9"]}, r"datasets: unknown dataset 'ETTh9'; known: .*ETTh1"),
    "unknown VLM": ("ok", {"search": {"model.vlm": {"type": "choice", "values": ["custom", "gpt4v"]}}},
                    r"unknown VLM 'gpt4v'; known: custom, clip, vilt, blip2"),
    "malformed search space": ("ok", {"search": {"model.d_model": {"type": "normal", "mean": 64}}},
                               r"search.model.d_model.type: unknown distribution 'normal'"),
    "searched setting that does not exist": ("ok", {"search": {"model.dmodel": {"type": "choice", "values": [1]}}},
                                             r"search.model.dmodel: unknown setting\(s\) in 'model': dmodel"),
    "out-of-range value": ("ok", {"fixed": {"model": {"seq_len": 96, "norm_const": -1}}},
                           r"norm_const must be in \(0, 10\], got -1"),
    "impossible combination": ("ok", {"fixed": {"model": {"seq_len": 96, "d_model": 30}}},
                               r"d_model \(30\) must be divisible by n_heads \(4\)"),
    "few-shot percent out of range": ("ok", {"fixed": {"model": {"seq_len": 96}, "data": {"percent": 0}}},
                                      r"percent must be an integer in \[1, 100\], got 0"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_a_clear_error(case, tmp_path, capsys, monkeypatch):
    make, study_changes, message = CASES[case]
    monkeypatch.chdir(tmp_path)  # nothing may be written here before the error
    data = tmp_path / "data"
    data.mkdir()
    if make == "ok":
        ett_frame().to_csv(data / "ETTh1.csv", index=False)
    elif make is not None:
        make(ett_frame()).to_csv(data / "ETTh1.csv", index=False)
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump({**BASE, **study_changes}))
    rc = main(["--study", str(study), "--data-dir", str(data)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "ray_results").exists()


def test_unknown_study_name(capsys):
    assert main(["--study", "no_such_study"]) == 2
    assert "study 'no_such_study' not found" in capsys.readouterr().err
