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
    (dict(instance_norm="batch"), "instance_norm must be revin, none or auto"),
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
    with pytest.raises(ConfigError, match="unknown setting\\(s\\) in 'model': dmodel"):
        ExperimentConfig.from_dict({"model": {"dmodel": 3}})


def test_flat_roundtrip():
    e = ExperimentConfig.from_dict({"model": {"seq_len": 96}, "train": {"epochs": 2}})
    assert e.flat()["model.seq_len"] == 96 and e.flat()["train.epochs"] == 2
    assert ExperimentConfig.from_dict(e.to_dict()) == e


def test_each_models_own_settings_are_written_in_unless_set():
    """`auto` (the default) becomes the model's own setting when the experiment is made, so MLflow logs what ran;
    what a user set stays."""
    from timevlm.config import MODEL_DEFAULTS

    assert (TrainConfig().ema_decay, TrainConfig().forecast_loss, ModelConfig().instance_norm) == ("auto",) * 3
    for model, own in MODEL_DEFAULTS.items():
        exp = ExperimentConfig.from_dict({"model": {"model": model}})
        assert (exp.model.instance_norm, exp.train.ema_decay, exp.train.forecast_loss) == (
            own.instance_norm, own.ema_decay, own.forecast_loss)
        assert "auto" not in exp.params().values()
    assert ExperimentConfig().flat()["train.ema_decay"] == 0.999
    assert ExperimentConfig().flat()["train.forecast_loss"] == "mse+mae"
    assert ExperimentConfig().flat()["model.instance_norm"] == "revin"
    explicit = ExperimentConfig.from_dict({"model": {"model": "dlinear", "instance_norm": "revin"},
                                           "train": {"ema_decay": 0.99, "forecast_loss": "mse+mae"}})
    assert (explicit.model.instance_norm, explicit.train.ema_decay, explicit.train.forecast_loss) == (
        "revin", 0.99, "mse+mae")
    assert ExperimentConfig.from_dict({"train": {"ema_decay": None}}).train.ema_decay is None
    # a model saved before `auto` existed carries instance_norm: null for it
    assert ExperimentConfig.from_dict({"model": {"instance_norm": None}}).model.instance_norm == "revin"


def test_training_with_an_unresolved_train_config_is_refused():
    """Only the model decides what `auto` means: a bare TrainConfig is resolved for it, or refused."""
    from timevlm.model import build_model
    from timevlm.training import TrainStep

    model = build_model(ModelConfig(model="dlinear", seq_len=96, pred_len=24, n_vars=7, periodicity=24))
    with pytest.raises(ConfigError, match="auto"):
        TrainStep(model, TrainConfig(), torch.device("cpu"))
    step = TrainStep(model, TrainConfig().resolved("dlinear"), torch.device("cpu"))
    assert step.ema is None and step.forecast_loss == "mse"
    assert TrainStep(model, TrainConfig().resolved("timevlm"), torch.device("cpu")).ema is not None


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
