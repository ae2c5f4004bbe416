"""The MLflow pyfunc of a trained forecaster (MLflow "models from code": this file is copied into every logged
model and executed when the model is loaded, so it imports only the `timevlm` library, which travels with the
model as code, and MLflow).

Input: a batch of windows in the dataset's original units, float32 [batch, seq_len, n_vars] (or one window
[seq_len, n_vars]). Output: the forecasts in the same units, [batch, pred_len, n_vars]. The model scales the
input with the training split's mean/std, exactly as in training, and computes the frozen VLM's features of
each window on the fly (the same encoder that filled the study's feature cache, keyed in the model metadata).
"""
from __future__ import annotations

import json

import mlflow.models
import numpy as np
from mlflow.pyfunc import PythonModel

class TimeVLMForecaster(PythonModel):
    # The signature is given explicitly (a tensor spec) when the model is logged. MLflow's type-hint based input
    # validation does not cover numpy tensors, and without this flag it warns on every definition of the class
    # (every load of the model) that predict() has no type hints.
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
        model = build_model(exp.model)
        model.load_state_dict(torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True))
        if getattr(model, "uses_features", False):
            model.attach_encoder(feature_encoder(exp, "cpu"))
        self.model = model.eval()

    def predict(self, context, model_input, params=None) -> np.ndarray:
        import torch

        x = np.asarray(model_input, dtype=np.float32)
        single = x.ndim == 2
        x = x[None] if single else x
        if x.ndim != 3 or x.shape[1:] != (self.seq_len, self.n_vars):
            raise ValueError(f"expected windows of shape [batch, {self.seq_len}, {self.n_vars}] "
                             f"(seq_len, n_vars), got {list(np.shape(model_input))}")
        with torch.inference_mode():
            y = self.model(torch.from_numpy((x - self.mean) / self.std)).numpy()
        y = y * self.std + self.mean
        return y[0] if single else y


mlflow.models.set_model(TimeVLMForecaster())
