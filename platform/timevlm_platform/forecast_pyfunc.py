"""The MLflow pyfunc of a trained forecaster (MLflow "models from code": this file is copied into every logged
model and executed when the model is loaded, so it imports only the `timevlm` library, which travels with the
model as code, and MLflow with its own numpy and pandas).

Input, in the dataset's original units: a batch of windows [batch, seq_len, n_vars] or one window
[seq_len, n_vars] (numpy, float32 or float64, or nested lists), or a pandas DataFrame with the dataset's
channel columns (the model metadata's `channels`) holding one window (seq_len rows) or several stacked
(a multiple of seq_len rows), optionally with a `date` column. Output: the forecasts in the same units,
[batch, pred_len, n_vars] float32 ([pred_len, n_vars] for one window; a DataFrame with the channel columns and
pred_len rows per window for a DataFrame, indexed by the pred_len timestamps after each window's last `date` at
the dataset's frequency when the input has dates). Anything else, an empty batch, and missing or infinite values
(which would turn every forecast of their window into NaN) are refused with a one-line error naming what was
expected and what came.
The model scales the input with the training split's mean/std, exactly as in training, and computes the
frozen VLM's features of each window on the fly (the same encoder that filled the study's feature cache, keyed
in the model metadata).
"""
from __future__ import annotations

import json

import mlflow.models
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

class TimeVLMForecaster(PythonModel):
    # The model has no input schema: MLflow would enforce one before predict() and no single schema takes both a
    # window and a batch, float64 and a DataFrame. predict() checks the input itself. Without this flag MLflow
    # warns on every definition of the class (every load of the model) that predict() has no type hints.
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        from timevlm.config import ExperimentConfig
        from timevlm.experiment import feature_encoder
        from timevlm.model import build_model

        exp = ExperimentConfig.from_dict(json.loads(open(context.artifacts["experiment"]).read()))
        scaler = json.loads(open(context.artifacts["scaler"]).read())
        self.mean = np.asarray(scaler["mean"], dtype=np.float32)
        self.std = np.asarray(scaler["std"], dtype=np.float32)
        self.seq_len, self.n_vars = exp.model.seq_len, exp.model.n_vars
        self.channels = list(scaler.get("channels") or [f"var_{i}" for i in range(self.n_vars)])
        self.freq = scaler.get("freq")  # the dataset's sampling step, for the forecast's timestamps
        self.pred_len = exp.model.pred_len
        model = build_model(exp.model)
        model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        if model.uses_features:
            model.attach_encoder(feature_encoder(exp, "cpu"))
        self.model = model.eval()

    def _expected(self) -> str:
        shown = ", ".join(self.channels[:4]) + (f", ... ({self.n_vars} in all)" if self.n_vars > 4 else "")
        return (f"expected [batch, {self.seq_len}, {self.n_vars}] or [{self.seq_len}, {self.n_vars}] float windows, "
                f"or a DataFrame with k x {self.seq_len} rows and the channel columns {shown} (the model "
                f"metadata's `channels`)")

    def windows(self, model_input) -> tuple[np.ndarray, str]:
        """The input as float32 [batch, seq_len, n_vars] and its form ("batch", "window" or "frame")."""
        if isinstance(model_input, pd.DataFrame):
            missing = [c for c in self.channels if c not in model_input.columns]
            if missing or len(model_input) == 0 or len(model_input) % self.seq_len:
                got = (f"no column {', '.join(map(str, missing[:4]))}{', ...' if len(missing) > 4 else ''}"
                       if missing else f"{len(model_input)} rows")
                raise ValueError(f"{self._expected()}; got a DataFrame with {got}")
            values = model_input[self.channels]
            if not all(pd.api.types.is_numeric_dtype(t) for t in values.dtypes):
                raise ValueError(f"{self._expected()}; got non-numeric columns")
            return self._finite(values.to_numpy(np.float32).reshape(-1, self.seq_len, self.n_vars)), "frame"
        try:
            x = np.asarray(model_input)
        except (TypeError, ValueError):
            x = None
        if x is None or x.dtype.kind not in "fiu":
            kind = type(model_input).__name__ if x is None else f"{type(model_input).__name__} of {x.dtype}"
            raise ValueError(f"{self._expected()}; got {kind}")
        if x.ndim == 3 and x.shape[0] == 0:
            raise ValueError(f"{self._expected()}; got an empty batch (0 windows)")
        if x.shape[-2:] != (self.seq_len, self.n_vars) or x.ndim not in (2, 3):
            raise ValueError(f"{self._expected()}; got shape {list(x.shape)} {x.dtype}")
        x = self._finite(x.astype(np.float32, copy=False))
        return (x[None], "window") if x.ndim == 2 else (x, "batch")

    def _finite(self, x: np.ndarray) -> np.ndarray:
        bad = ~np.isfinite(x)
        if bad.any():
            w, t, c = (np.argwhere(bad.reshape(-1, self.seq_len, self.n_vars))[0]).tolist()
            raise ValueError(f"the input has {int(bad.sum())} missing or infinite value(s), the first in window {w} "
                             f"at step {t}, channel {self.channels[c]}: fill or drop them first (one would make "
                             f"every forecast of its window NaN)")
        return x

    def _timestamps(self, frame: pd.DataFrame) -> pd.Index | None:
        """The pred_len timestamps after each window's last `date` (a MultiIndex (window, date) for several)."""
        if "date" not in frame.columns:
            return None
        dates = pd.to_datetime(frame["date"], errors="coerce")
        if dates.isna().any():
            raise ValueError(f"the DataFrame's `date` column has {int(dates.isna().sum())} value(s) that are not "
                             f"dates")
        freq = self.freq or pd.infer_freq(dates.iloc[:self.seq_len])
        if freq is None:
            raise ValueError("the model names no sampling frequency and none can be inferred from `date`")
        last = dates.iloc[self.seq_len - 1::self.seq_len]
        stamps = [pd.date_range(d, periods=self.pred_len + 1, freq=freq)[1:] for d in last]
        if len(stamps) == 1:
            return stamps[0].rename("date")
        return pd.MultiIndex.from_tuples([(i, d) for i, s in enumerate(stamps) for d in s], names=["window", "date"])

    def predict(self, context, model_input, params=None):
        import torch

        x, form = self.windows(model_input)
        with torch.inference_mode():
            y = self.model(torch.from_numpy((x - self.mean) / self.std)).numpy()
        y = y * self.std + self.mean
        if form == "frame":
            return pd.DataFrame(y.reshape(-1, self.n_vars), columns=self.channels, index=self._timestamps(model_input))
        return y[0] if form == "window" else y


mlflow.models.set_model(TimeVLMForecaster())
