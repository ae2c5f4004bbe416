import pytest
import torch

from timevlm.config import DataConfig, ExperimentConfig, ModelConfig, RunEnv, TrainConfig
from timevlm.errors import ConfigError


def test_paper_defaults():
    c = ModelConfig()
    assert (c.seq_len, c.d_model, c.d_fusion, c.norm_const, c.patch_len, c.stride, c.padding,
            c.n_heads, c.image_size, c.dropout) == (512, 128, 256, 0.4, 16, 8, 8, 4, 64, 0.1)
    t = TrainConfig()
    assert (t.batch_size, t.lr, t.epochs, t.patience) == (32, 1e-3, 10, 3)
    assert c.num_patches == (512 + 8 - 16) // 8 + 1


@pytest.mark.parametrize("kwargs,msg", [
    (dict(seq_len=16, patch_len=16), "seq_len \\(16\\) must be greater than patch_len \\(16\\)"),
    (dict(d_model=30, n_heads=4), "d_model \\(30\\) must be divisible by n_heads"),
    (dict(norm_const=0), "norm_const must be in"),
    (dict(instance_norm="batch"), "instance_norm must be revin or none"),
    (dict(vlm="llava"), "unknown VLM 'llava'"),
    (dict(use_ral=False, use_val=False, use_tal=False), "at least one of use_ral"),
    (dict(pred_len=0), "pred_len must be a positive integer"),
])
def test_impossible_model_configs(kwargs, msg):
    with pytest.raises(ConfigError, match=msg):
        ModelConfig(**kwargs)


def test_other_sections_validate():
    with pytest.raises(ConfigError, match="percent must be an integer in \\[1, 100\\]"):
        DataConfig(percent=0)
    with pytest.raises(ConfigError, match="lr must be in"):
        TrainConfig(lr=5)
    with pytest.raises(ConfigError, match="ema_decay must be in \\(0, 1\\), auto or null, got 1"):
        TrainConfig(ema_decay=1)
    with pytest.raises(ConfigError, match="unknown key\\(s\\) in 'model': dmodel"):
        ExperimentConfig.from_dict({"model": {"dmodel": 3}})


def test_flat_roundtrip():
    e = ExperimentConfig.from_dict({"model": {"seq_len": 96}, "train": {"epochs": 2}})
    assert e.flat()["model.seq_len"] == 96 and e.flat()["train.epochs"] == 2
    assert ExperimentConfig.from_dict(e.to_dict()) == e


def test_weight_averaging_is_each_models_own_setting_unless_set():
    from timevlm.config import EMA_DECAY_BY_MODEL

    assert TrainConfig().ema_decay == "auto"
    for model, decay in EMA_DECAY_BY_MODEL.items():  # resolved to the number MLflow will show
        assert ExperimentConfig.from_dict({"model": {"model": model}}).train.ema_decay == decay
    assert ExperimentConfig().train.ema_decay == 0.999
    explicit = ExperimentConfig.from_dict({"model": {"model": "dlinear"}, "train": {"ema_decay": 0.99}})
    assert explicit.train.ema_decay == 0.99
    assert ExperimentConfig.from_dict({"train": {"ema_decay": None}}).train.ema_decay is None
    assert ExperimentConfig().flat()["train.ema_decay"] == 0.999


def test_fit_with_a_bare_train_config_averages_as_the_experiment_would():
    """`fit` given TrainConfig() ("auto") picks the same setting by the module's class as the config by name."""
    from timevlm.model import build_model
    from timevlm.training import _weight_average

    for name in ("timevlm", "dlinear", "patchtst"):
        model = build_model(ModelConfig(model=name, seq_len=96, pred_len=24, n_vars=7, periodicity=24, d_model=16))
        ema = _weight_average(model, "auto")
        assert (ema is None) == (ExperimentConfig.from_dict({"model": {"model": name}}).train.ema_decay is None)
    assert _weight_average(torch.nn.Linear(2, 2), "auto") is None  # a model with no setting: no average


def test_an_experiment_is_resolved_once_on_construction():
    """What the dataset decides is written in when the experiment is made, so the model, the feature cache's key
    and MLflow's parameters all read the same numbers; what a user set stays."""
    weather = ExperimentConfig(data=DataConfig(dataset="Weather"))
    assert (weather.model.n_vars, weather.model.periodicity, weather.model.dataset_name) == (21, 144, "Weather")
    assert weather.model.dataset_description  # the prompt's description of the dataset
    assert ExperimentConfig.from_dict(weather.to_dict()) == weather  # what a Tune trial hands its workers
    mine = ExperimentConfig(model=ModelConfig(n_vars=3, periodicity=12), data=DataConfig(dataset="ETTh1"))
    assert (mine.model.n_vars, mine.model.periodicity) == (3, 12)
    with pytest.raises(ConfigError, match="ETTh9"):
        ExperimentConfig(data=DataConfig(dataset="ETTh9"))


def test_where_a_run_executes_is_set_apart_and_never_a_parameter():
    exp = ExperimentConfig(model=ModelConfig(seq_len=96), train=TrainConfig(epochs=2))
    here = exp.placed(RunEnv(data_dir="/data", cache_dir="/cache", device="cpu", num_threads=2, progress=False))
    assert (here.data.data_dir, here.train.cache_dir, here.train.device, here.train.num_threads,
            here.train.progress) == ("/data", "/cache", "cpu", 2, False)
    assert here.train.use_feature_cache is True and exp.train.progress is True  # unset: kept; exp unchanged
    assert exp.placed(RunEnv()) == exp
    assert here.params() == exp.params()  # the machine never changes what was trained
    env_keys = {"data.data_dir", "train.cache_dir", "train.device", "train.num_threads", "train.progress",
                "train.use_feature_cache", "train.cache_fallback"}
    assert env_keys <= set(exp.flat()) and not env_keys & set(exp.params())
    assert exp.params()["model.seq_len"] == 96 and exp.params()["train.epochs"] == 2
