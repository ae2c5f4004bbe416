"""The logged pyfunc takes what a user has: a batch, one window, float32 or float64, a DataFrame with the
dataset's channel names; anything else gets a short error naming what it expected and what it got."""
from __future__ import annotations

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch

from timevlm.config import ExperimentConfig
from timevlm.data.files import value_columns
from timevlm.data.registry import get_dataset
from timevlm.experiment import prepare
from timevlm_platform.model_logging import save_forecast_model

SEQ, PRED = 48, 24


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    """A DLinear on ETTh1 (no VLM: the pyfunc's input handling is the same for every model), saved and loaded
    through MLflow, with the raw test windows it must reproduce."""
    exp = ExperimentConfig.from_dict({"model": {"model": "dlinear", "seq_len": SEQ, "pred_len": PRED},
                                      "data": {"dataset": "ETTh1", "max_windows": 64},
                                      "train": {"device": "cpu", "progress": False}})
    p = prepare(exp, progress=False)
    with torch.no_grad():
        for prm in p.model.parameters():
            prm.add_(torch.randn_like(prm) * 0.01)  # not the mean forecast it starts as
    folder = save_forecast_model(p, p.model, tmp_path_factory.mktemp("m") / "model")
    test = p.splits["test"]
    raw = test.scaler.inverse(test.inputs(np.arange(3)).numpy())
    with torch.no_grad():
        want = test.scaler.inverse(p.model(test.inputs(np.arange(3))).numpy())
    return mlflow.pyfunc.load_model(str(folder)), raw, want


def test_a_batch_one_window_float64_and_a_dataframe_give_the_same_forecasts(forecaster):
    model, raw, want = forecaster
    channels = value_columns(get_dataset("ETTh1"))
    assert model.metadata.metadata["channels"] == channels == ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    batch = model.predict(raw.astype(np.float32))
    assert batch.shape == (3, PRED, 7) and batch.dtype == np.float32
    np.testing.assert_allclose(batch, want, rtol=1e-4, atol=1e-4)
    one = model.predict(raw[1].astype(np.float64))  # one window, float64
    assert one.shape == (PRED, 7)
    np.testing.assert_allclose(one, want[1], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(model.predict(raw.tolist()), want, rtol=1e-4, atol=1e-4)  # nested lists
    # a DataFrame with the channel columns (any order, extra columns ignored), two windows stacked
    frame = pd.DataFrame(raw[:2].reshape(-1, 7), columns=channels)[channels[::-1]].assign(note="x")
    out = model.predict(frame)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == channels and len(out) == 2 * PRED
    np.testing.assert_allclose(out.to_numpy().reshape(2, PRED, 7), want[:2], rtol=1e-4, atol=1e-4)


def test_a_dataframe_with_dates_comes_back_indexed_by_the_next_timestamps(forecaster):
    """ETTh1 is hourly: the forecast of a window ending 2018-03-02 23:00 is indexed 2018-03-03 00:00 ... +23 h."""
    model, raw, want = forecaster
    channels = model.metadata.metadata["channels"]
    dates = pd.date_range("2018-03-01 00:00", periods=SEQ, freq="h")
    out = model.predict(pd.DataFrame(raw[0], columns=channels).assign(date=dates.astype(str)))
    assert isinstance(out.index, pd.DatetimeIndex) and out.index.name == "date"
    assert out.index[0] == pd.Timestamp("2018-03-03 00:00") and out.index[-1] == pd.Timestamp("2018-03-03 23:00")
    np.testing.assert_allclose(out.to_numpy(), want[0], rtol=1e-4, atol=1e-4)
    two = pd.DataFrame(raw[:2].reshape(-1, 7), columns=channels).assign(
        date=pd.date_range("2018-03-01", periods=2 * SEQ, freq="h"))
    idx = model.predict(two).index
    assert idx.names == ["window", "date"] and idx[PRED] == (1, pd.Timestamp("2018-03-05 00:00"))


def test_a_saved_model_names_no_machine_path(forecaster):
    import json

    config = json.loads(forecaster[0].metadata.metadata["timevlm_config"])
    assert config["data"]["dataset"] == "ETTh1" and config["model"]["seq_len"] == SEQ
    assert not {"data_dir", "cache_dir", "device", "num_threads"} & {k for sec in config.values() for k in sec}


@pytest.mark.parametrize("bad, says", [
    (np.zeros((2, 96, 7), np.float32), "got shape [2, 96, 7] float32"),
    (np.zeros((SEQ, 6)), "got shape [48, 6] float64"),
    (np.zeros(SEQ * 7), "got shape [336] float64"),
    (np.array([["a"] * 7] * SEQ), "got ndarray of <U1"),
    (pd.DataFrame(np.zeros((SEQ, 7)), columns=list("abcdefg")), "got a DataFrame with no column HUFL, HULL, MUFL, "
                                                                "MULL, ..."),
    (pd.DataFrame(np.zeros((SEQ + 1, 7)), columns=["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]),
     "got a DataFrame with 49 rows"),
    (np.zeros((0, SEQ, 7), np.float32), "got an empty batch (0 windows)"),
])
def test_anything_else_gets_a_short_error_naming_expected_and_received(forecaster, bad, says):
    model = forecaster[0]
    with pytest.raises(Exception) as e:
        model.predict(bad)
    msg = str(e.value)
    assert says in msg and f"expected [batch, {SEQ}, 7] or [{SEQ}, 7]" in msg
    assert len(msg) < 330 and "\n" not in msg, msg  # one line, no dump of the input
    assert "the channel columns HUFL, HULL, MUFL, MULL, ... (7 in all)" in msg and "'...'" not in msg


def test_a_missing_value_is_refused_not_turned_into_nan_forecasts(forecaster):
    model, raw, _ = forecaster
    x = raw.astype(np.float64)
    x[2, 10, 6] = np.nan
    with pytest.raises(Exception, match=r"1 missing or infinite value\(s\), the first in window 2 at step 10, "
                                        r"channel OT"):
        model.predict(x)
