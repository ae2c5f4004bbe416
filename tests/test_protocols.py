"""Evaluation protocols as study options (long-term, few-shot, zero-shot), seeds, and the baselines,
each run for real on a tiny budget."""
from __future__ import annotations

import copy

import pytest
import torch

from timevlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from timevlm.errors import ConfigError
from timevlm.experiment import run_experiment
from timevlm.model import build_model
from timevlm_platform.search_space import param_space
from timevlm_platform.study import ZERO_SHOT_PAIRS, Cell, load_study, parse_study

BASE = {"name": "p", "fixed": {"model": {"seq_len": 48}}, "budget": {"trials": 1, "epochs": 1},
        "search": {"model.model": {"type": "grid", "values": ["timevlm"]}}, "searcher": "grid"}


def tiny(shared_cache, **kw) -> ExperimentConfig:
    return ExperimentConfig(model=ModelConfig(seq_len=48, pred_len=24, d_model=16, d_fusion=32, **kw.pop("model", {})),
                            data=DataConfig(max_windows=96, **kw.pop("data", {})),
                            train=TrainConfig(epochs=1, progress=False, cache_dir=shared_cache, num_threads=1))


def test_long_term_cells_cover_every_horizon():
    spec = load_study("long_term")
    assert spec.horizons == [96, 192, 336, 720]
    assert len(spec.cells()) == len(spec.datasets) * 4


def test_few_shot_protocol_sets_the_percent():
    spec = parse_study({**copy.deepcopy(BASE), "protocol": {"type": "few_shot", "percent": 5}})
    assert spec.experiment("ETTh1", 96, {}).data.percent == 5
    with pytest.raises(ConfigError, match="protocol.percent"):
        parse_study({**copy.deepcopy(BASE), "protocol": {"type": "few_shot", "percent": 0}})
    with pytest.raises(ConfigError, match="protocol.type: 'one_shot'"):
        parse_study({**copy.deepcopy(BASE), "protocol": {"type": "one_shot"}})


def test_zero_shot_protocol_uses_the_papers_eight_pairs():
    spec = load_study("zero_shot")
    cells = spec.cells()
    assert len(cells) == 8 * 4 and Cell("ETTh1", 96, "ETTh2") in cells
    assert sorted(map(tuple, ZERO_SHOT_PAIRS)) == sorted({(c.dataset, c.test_dataset) for c in cells})
    exp = spec.experiment("ETTm1", 96, {}, "ETTh2")
    assert (exp.data.dataset, exp.data.test_dataset) == ("ETTm1", "ETTh2")
    assert len(spec.with_smoke().cells()) == 1


def test_seeds_repeat_grid_points():
    spec = parse_study({**copy.deepcopy(BASE), "seeds": 3, "seed": 10})
    assert param_space(spec)["train.seed"] == {"grid_search": [10, 11, 12]}
    with pytest.raises(ConfigError, match="seeds: repeating over seeds needs `searcher: grid`"):
        parse_study({**copy.deepcopy(BASE), "seeds": 2, "searcher": "optuna",
                     "search": {"model.d_model": {"type": "choice", "values": [16, 32]}}})


def test_few_shot_and_zero_shot_train_for_real(data_dir, shared_cache):
    few = run_experiment(tiny(shared_cache, data={"dataset": "ETTh1", "percent": 5}))
    assert few["n_train_windows"] == 96 and few["test_mse"] > 0  # 5% of 8617 windows, then capped at 96
    zero = run_experiment(tiny(shared_cache, data={"dataset": "ETTh1", "test_dataset": "ETTh2"}))
    same = run_experiment(tiny(shared_cache, data={"dataset": "ETTh1"}))
    assert zero["best_val_mse"] == same["best_val_mse"]  # same training and validation...
    assert zero["test_mse"] != same["test_mse"]  # ...tested on another dataset


@pytest.mark.parametrize("kind", ["dlinear", "patchtst"])
def test_baselines_train_in_the_same_harness(data_dir, shared_cache, kind):
    out = run_experiment(tiny(shared_cache, model={"model": kind}, data={"dataset": "ETTh1"}))
    assert out["epochs_run"] == 1 and 0 < out["test_mse"] < 5
    assert "cache_builds" not in out  # baselines never touch the VLM
    model = build_model(ModelConfig(seq_len=96, pred_len=24, n_vars=7, periodicity=24, model=kind, d_model=16))
    assert model(torch.zeros(3, 96, 7)).shape == (3, 24, 7)
