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
    frame = pd.DataFrame(raw[:2].reshape(-1, 7), columns=channels)[channels[::-1]].assign(date="x")
    out = model.predict(frame)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == channels and len(out) == 2 * PRED
    np.testing.assert_allclose(out.to_numpy().reshape(2, PRED, 7), want[:2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad, says", [
    (np.zeros((2, 96, 7), np.float32), "got shape [2, 96, 7] float32"),
    (np.zeros((SEQ, 6)), "got shape [48, 6] float64"),
    (np.zeros(SEQ * 7), "got shape [336] float64"),
    (np.array([["a"] * 7] * SEQ), "got ndarray of <U1"),
    (pd.DataFrame(np.zeros((SEQ, 7)), columns=list("abcdefg")), "missing columns ['HUFL', 'HULL', 'MUFL', 'MULL']"),
    (pd.DataFrame(np.zeros((SEQ + 1, 7)), columns=["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]),
     "got a DataFrame with 49 rows"),
])
def test_anything_else_gets_a_short_error_naming_expected_and_received(forecaster, bad, says):
    model = forecaster[0]
    with pytest.raises(Exception) as e:
        model.predict(bad)
    msg = str(e.value)
    assert says in msg and f"expected [batch, {SEQ}, 7] or [{SEQ}, 7]" in msg
    assert len(msg) < 300, msg  # no dump of the input
