"""M4 Hourly/Weekly protocol: per-series splits, the fixed horizon, metrics on the original scale vs Naive2."""
from __future__ import annotations

import numpy as np
import pytest

from timevlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from timevlm.data.m4 import load_m4, m4_metrics
from timevlm.data.registry import get_dataset
from timevlm.data.splits import build_splits
from timevlm.errors import DataError
from timevlm.experiment import run_experiment
from timevlm.metrics import mase, smape


def test_m4_hourly_splits(data_dir):
    splits = build_splits(DataConfig(dataset="M4-Hourly"), 96, 48)
    assert len(splits["val"]) == len(splits["test"]) == 414  # one window per series
    data = load_m4(get_dataset("M4-Hourly"))
    test = splits["test"]
    i = 7
    x, y = test.window(i)
    assert test.series[i] == i
    np.testing.assert_allclose(y[:, 0] * test.series_std[i] + test.series_mean[i], data.test[i], rtol=1e-4)
    np.testing.assert_allclose(x[:, 0] * test.series_std[i] + test.series_mean[i], data.train[i][-96:], rtol=1e-4)
    vx, vy = splits["val"].window(i)  # validation: the last horizon of the training series
    np.testing.assert_allclose(vy[:, 0] * test.series_std[i] + test.series_mean[i], data.train[i][-48:], rtol=1e-4)
    with pytest.raises(DataError, match="fixes the horizon at 48, got pred_len 96"):
        build_splits(DataConfig(dataset="M4-Hourly"), 96, 96)


def test_data_parallel_shards_keep_each_windows_series(data_dir):
    """Sharding the training windows across Train workers must carry the per-window M4 fields along."""
    from timevlm_platform.worker import shard

    train = build_splits(DataConfig(dataset="M4-Hourly"), 96, 48)["train"]
    parts = [shard(train, None, rank, 3)[0] for rank in range(3)]
    assert sum(len(p) for p in parts) == len(train)
    assert sorted(np.concatenate([p.starts for p in parts]).tolist()) == sorted(train.starts.tolist())
    p1 = parts[1]
    for j in (0, len(p1) - 1):
        i = 1 + 3 * j  # rank 1 of 3 holds windows 1, 4, 7, ...
        assert p1.starts[j] == train.starts[i]
        assert (p1.series[j], p1.series_mean[j], p1.series_std[j]) == \
            (train.series[i], train.series_mean[i], train.series_std[i])


def test_naive2_scores_itself_as_owa_one(data_dir):
    splits = build_splits(DataConfig(dataset="M4-Weekly"), 26, 13)
    test = splits["test"]
    data = load_m4(get_dataset("M4-Weekly"))
    naive_scaled = ((data.naive2 - test.series_mean[:, None]) / test.series_std[:, None])[..., None]
    m = m4_metrics(naive_scaled, test, "M4-Weekly")
    assert m["test_owa"] == pytest.approx(1.0)
    assert m["test_smape"] == pytest.approx(smape(data.naive2, data.test))
    assert m["test_mase"] == pytest.approx(np.mean([mase(data.naive2[k], data.test[k], data.train[k], 1)
                                                    for k in range(len(data.ids))]))


def test_tiny_m4_run_reports_smape_mase_owa(data_dir, shared_cache):
    out = run_experiment(ExperimentConfig(
        model=ModelConfig(seq_len=96, pred_len=48, d_model=16, d_fusion=32),
        data=DataConfig(dataset="M4-Hourly", max_windows=64),
        train=TrainConfig(epochs=1, progress=False, cache_dir=shared_cache, num_threads=1)))
    assert out["n_test_windows"] == 64
    assert 0 < out["test_smape"] < 200 and out["test_mase"] > 0 and out["test_owa"] > 0
