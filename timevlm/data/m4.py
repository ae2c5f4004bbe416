"""M4 Hourly/Weekly: per-series windows, validation on the last horizon of each training series, test on
the competition's test horizon, SMAPE/MASE/OWA against the Naive2 forecasts shipped with the data.

Each series is standardised with the mean/std of its own training part (the part before the validation
horizon); metrics are computed after undoing that scaling, on the original values, as the competition does.
Training windows step by one horizon through each series' training part; series shorter than
seq_len + horizon are left-padded with their first value.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from timevlm.config import DataConfig
from timevlm.data.files import dataset_path
from timevlm.data.registry import DatasetSpec, get_dataset
from timevlm.data.windows import Scaler, SplitData, subsample
from timevlm.errors import DataError
from timevlm.metrics import mase, owa, smape


@dataclass
class M4Data:
    ids: list[str]
    train: list[np.ndarray]  # full training history of each series
    test: np.ndarray  # [n_series, horizon]
    naive2: np.ndarray  # [n_series, horizon]


def _read(path: Path, what: str) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"{path}: M4 {what} file not found")
    return pd.read_csv(path)


@lru_cache(maxsize=4)
def _load(train_path: str, horizon: int) -> M4Data:
    train_path = Path(train_path)
    test_path = train_path.with_name(train_path.name.replace("-train", "-test"))
    naive_path = train_path.with_name("Naive2-Hourly-Weekly.csv")
    tr, te, nv = _read(train_path, "train"), _read(test_path, "test"), _read(naive_path, "Naive2 forecast")
    ids = tr.iloc[:, 0].astype(str).tolist()
    if te.iloc[:, 0].astype(str).tolist() != ids:
        raise DataError(f"{test_path}: series ids do not match {train_path.name}")
    nv = nv.set_index(nv.columns[0])
    missing = [i for i in ids if i not in nv.index]
    if missing:
        raise DataError(f"{naive_path}: no Naive2 forecast for {len(missing)} series, e.g. {missing[:3]}")
    series = [row[~np.isnan(row)] for row in tr.iloc[:, 1:].to_numpy(dtype=float)]
    test = te.iloc[:, 1:horizon + 1].to_numpy(dtype=float)
    if np.isnan(test).any() or test.shape[1] != horizon:
        raise DataError(f"{test_path}: expected {horizon} test values per series without NaNs")
    return M4Data(ids, series, test, nv.loc[ids].iloc[:, :horizon].to_numpy(dtype=float))


def load_m4(spec: DatasetSpec, data_dir=None) -> M4Data:
    path = dataset_path(spec, data_dir)
    return _load(str(path), spec.horizon)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    return x if len(x) >= n else np.concatenate([np.full(n - len(x), x[0]), x])


def m4_splits(name: str, seq_len: int, pred_len: int, cfg: DataConfig) -> dict:
    spec = get_dataset(name)
    if pred_len != spec.horizon:
        raise DataError(f"{name}: the M4 protocol fixes the horizon at {spec.horizon}, got pred_len {pred_len}")
    if cfg.test_dataset:
        raise DataError(f"{name}: zero-shot test datasets are not supported for M4")
    data = load_m4(spec, cfg.data_dir)
    h, w = pred_len, seq_len + pred_len
    parts: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in ("train", "val", "test")}
    for i, s in enumerate(data.train):
        fit = s[:-h] if len(s) > h else s
        mu, sd = fit.mean(), fit.std() or 1.0
        z = (s - mu) / sd
        train_part = _pad(z[:-h], w)
        segments = {
            "train": (train_part, np.arange(0, len(train_part) - w + 1, h)),
            "val": (_pad(z, w)[-w:], np.array([0])),
            "test": (np.concatenate([_pad(z, seq_len)[-seq_len:], (data.test[i] - mu) / sd]), np.array([0])),
        }
        for split, (seg, starts) in segments.items():
            vals, sts, meta = parts[split]
            offset = sum(len(v) for v in vals)
            vals.append(seg)
            sts.append(starts + offset)
            meta.extend([(i, mu, sd)] * len(starts))
    out = {}
    for split, (vals, sts, meta) in parts.items():
        values = np.concatenate(vals).astype(np.float32)[:, None]
        starts = np.concatenate(sts)
        m = np.array(meta)
        full = SplitData(spec.name, split, values, starts, seq_len, pred_len, Scaler(np.zeros(1), np.ones(1)),
                         spec.description, series=m[:, 0].astype(int), series_mean=m[:, 1], series_std=m[:, 2])
        out[split] = full.subset(subsample(np.arange(len(starts)), cfg.max_windows))
    return out


def m4_metrics(pred: np.ndarray, split, name: str, data_dir=None) -> dict[str, float]:
    """SMAPE, MASE and OWA of test forecasts (scaled, [n, H, 1]) on the original scale, vs Naive2."""
    spec = get_dataset(name)
    data = load_m4(spec, data_dir)
    idx = split.series
    yhat = pred[..., 0] * split.series_std[:, None] + split.series_mean[:, None]
    true, naive = data.test[idx], data.naive2[idx]
    m = spec.seasonal_period
    s_model, s_naive = smape(yhat, true), smape(naive, true)
    ma_model = float(np.mean([mase(yhat[k], true[k], data.train[i], m) for k, i in enumerate(idx)]))
    ma_naive = float(np.mean([mase(naive[k], true[k], data.train[i], m) for k, i in enumerate(idx)]))
    return {"test_smape": s_model, "test_mase": ma_model, "test_owa": owa(s_model, ma_model, s_naive, ma_naive),
            "naive2_smape": s_naive, "naive2_mase": ma_naive}
