"""Study files: every shipped study parses; malformed files get errors that name the key; search spaces."""
from __future__ import annotations

import copy

import pytest
from ray import tune

from timevlm.errors import ConfigError
from timevlm_platform.search_space import DistinctOptunaSearch, param_space, searcher
from timevlm_platform.study import SEARCH_SPACES_DIR, load_study, parse_study

GOOD = {
    "name": "t", "datasets": ["ETTh1"], "horizons": [96],
    "fixed": {"model": {"seq_len": 96}},
    "search": {"model.norm_const": {"type": "choice", "values": [0.1, 0.4]},
               "train.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
    "budget": {"trials": 2, "epochs": 1},
}


def test_shipped_studies_parse():
    names = {p.stem for p in SEARCH_SPACES_DIR.glob("*.yaml")}
    assert {"default", "input_length", "norm_const", "d_model", "d_fusion", "vlm_variant", "joint"} <= names
    for name in names:
        spec = load_study(name)
        assert spec.name == name
        smoke = spec.with_smoke()
        assert smoke.trials <= spec.trials and smoke.epochs <= spec.epochs


def test_joint_study_searches_all_five():
    keys = {p.key for p in load_study("joint").search}
    assert keys == {"model.norm_const", "model.d_model", "model.d_fusion", "model.seq_len", "model.vlm"}


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.pop("name"), "missing key 'name'"),
    (lambda d: d.update(budgett={}), r"unknown key\(s\) \['budgett'\]"),
    (lambda d: d["search"].update({"model.d_modle": {"type": "choice", "values": [1]}}), r"search\.model\.d_modle: unknown setting\(s\) in 'model': d_modle"),
    (lambda d: d["search"].update({"model.d_model": {"type": "normal", "mu": 1}}), r"search\.model\.d_model\.type: unknown distribution 'normal'"),
    (lambda d: d["search"].update({"model.d_model": {"type": "choice"}}), r"search\.model\.d_model: 'choice' needs values"),
    (lambda d: d["search"].update({"train.lr": {"type": "loguniform", "low": 0, "high": 1}}), r"search\.train\.lr: loguniform needs low > 0"),
    (lambda d: d["search"].update({"train.lr": {"type": "uniform", "low": 2, "high": 1}}), r"search\.train\.lr: low must be a number below high"),
    (lambda d: d["fixed"]["model"].update(seqlen=3), r"fixed\.model: unknown setting\(s\) in 'model': seqlen"),
    (lambda d: d["fixed"]["model"].update(seq_len=8), r"seq_len \(8\) must be greater than patch_len"),
    (lambda d: d.update(datasets=["ETTh9"]), r"datasets: unknown dataset 'ETTh9'"),
    (lambda d: d.update(metric="test_mse"), r"metric: 'test_mse' must be one of"),
    (lambda d: d.update(resources={"gpus": 1}), r"resources: unknown key\(s\) \['gpus'\]"),
    (lambda d: d["search"].update({"model.vlm": {"type": "choice", "values": ["gpt"]}}), r"unknown VLM 'gpt'"),
])
def test_malformed_study_names_the_key(mutate, msg):
    d = copy.deepcopy(GOOD)
    mutate(d)
    with pytest.raises(ConfigError, match=msg):
        parse_study(d, "bad.yaml")


def test_unknown_study_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="study 'nope' not found.*known studies: .*default"):
        load_study("nope")
    f = tmp_path / "broken.yaml"
    f.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_study(str(f))


def test_param_space_and_trial_config():
    spec = parse_study(copy.deepcopy(GOOD))
    space = param_space(spec)
    assert isinstance(space["model.norm_const"], tune.search.sample.Categorical)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    exp = spec.experiment("ETTh1", 192, {"model.norm_const": 0.4, "train.lr": 1e-3})
    assert (exp.model.norm_const, exp.model.pred_len, exp.model.seq_len, exp.train.epochs) == (0.4, 192, 96, 1)


def test_optuna_search_never_repeats_a_configuration_until_the_space_is_used_up():
    spec = parse_study({**copy.deepcopy(GOOD), "seed": 7, "search": {
        "model.d_fusion": {"type": "choice", "values": [32, 64]},
        "model.d_model": {"type": "choice", "values": [16, 32]},
        "model.norm_const": {"type": "choice", "values": [0.1, 0.4, 1.0]}}})
    s = searcher(spec)
    assert isinstance(s, DistinctOptunaSearch)
    s.set_search_properties("best_val_mse", "min", param_space(spec))
    configs = [s.suggest(f"t{i}") for i in range(12)]
    assert len({tuple(sorted(c.items())) for c in configs}) == 12


def test_asha_never_stops_a_trial_at_its_last_epoch():
    from timevlm_platform.search_space import scheduler

    spec = load_study("default")
    asha = scheduler(spec)
    assert asha._max_t == spec.epochs + 1  # reaching the last epoch must not count as "stop"


def test_reduced_budget_copy_is_its_own_study():
    base = load_study("norm_const")
    s = base.with_overrides(epochs=3, datasets=["ETTh1"], settings=["model.seq_len=96"])
    assert s.name == "norm_const-epochs3-ETTh1-seq_len96"  # own MLflow experiment and Ray results
    assert (s.epochs, s.datasets) == (3, ["ETTh1"])
    exp = s.experiment("ETTh1", 96, {"model.norm_const": 0.7})
    assert (exp.model.seq_len, exp.model.norm_const, exp.train.epochs) == (96, 0.7, 3)
    assert base.epochs == 10 and base.fixed["model"]["seq_len"] == 512  # the original is untouched
    assert base.with_overrides() is base
    assert load_study("baselines").with_overrides(seeds=2).seeds == 2
    assert load_study("default").with_smoke().with_overrides(epochs=2).experiment("ETTh1", 96, {}).train.epochs == 2
    with pytest.raises(ConfigError, match="model.norm_const is searched by study 'norm_const'"):
        base.with_overrides(settings=["model.norm_const=0.4"])
    with pytest.raises(ConfigError, match="--set model.dmodel=64: unknown setting\\(s\\) in 'model': dmodel"):
        base.with_overrides(settings=["model.dmodel=64"])
    with pytest.raises(ConfigError, match="budget: trials and epochs must be >= 1"):
        base.with_overrides(epochs=0)


def test_variants_and_presets_resolve_per_cell():
    spec = load_study("long_term")
    assert param_space(spec)["variant"] == tune.grid_search(["ours", "official", "long_input"])
    official = spec.experiment("ETTh1", 336, {"variant": "official"})
    # the official script's ETTh1-336 settings, laid over the study's fixed d_model 128
    assert (official.model.d_model, official.model.dropout, official.model.memory_gate) == (64, 0.1, True)
    assert (official.model.image_size, official.train.epochs, official.model.seq_len) == (56, 15, 512)
    assert spec.experiment("ETTm2", 720, {"variant": "official"}).model.d_model == 32
    ours = spec.experiment("ETTh1", 336, {"variant": "ours"})
    assert (ours.model.d_model, ours.model.image_size, ours.train.epochs) == (128, 64, 10)
    long_input = spec.experiment("ETTm1", 720, {"variant": "long_input"})
    assert (long_input.model.d_model, long_input.model.dropout, long_input.train.epochs) == (16, 0.3, 10)
    # a reduced budget and a smoke run win over the preset's 15 epochs and seq_len 512
    assert spec.with_overrides(epochs=2).experiment("ETTh1", 96, {"variant": "official"}).train.epochs == 2
    smoke = spec.with_smoke().experiment("ETTh1", 96, {"variant": "official"})
    assert (smoke.train.epochs, smoke.model.seq_len, smoke.data.max_windows) == (1, 96, 128)
    few = load_study("few_shot")
    assert param_space(few)["variant"] == tune.grid_search(["ours", "official", "dlinear", "patchtst"])
    # the official few-shot script: d_model per dataset and horizon, dropout 0.1 and the memory gate everywhere
    fs = few.experiment("ETTm1", 336, {"variant": "official"})
    assert (fs.model.d_model, fs.model.dropout, fs.model.memory_gate, fs.data.percent) == (256, 0.1, True, 10)
    assert few.experiment("ETTh2", 720, {"variant": "official"}).model.d_model == 512
    assert few.experiment("ETTh1", 96, {"variant": "dlinear"}).model.model == "dlinear"
    zs = load_study("zero_shot").experiment("ETTm2", 192, {"variant": "official"}, "ETTm1")
    assert (zs.model.d_model, zs.model.memory_gate, zs.model.periodicity, zs.train.epochs) == (64, True, 24, 15)
    assert (zs.data.dataset, zs.data.test_dataset) == ("ETTm2", "ETTm1")
    ablation = load_study("ablation")
    assert ablation.searched_keys == ["variant"] and list(ablation.variants)[0] == "full"
    switches = {v: ablation.experiment("ETTh1", 96, {"variant": v}).model for v in ablation.variants}
    assert [(m.use_ral, m.use_val, m.use_tal) for m in switches.values()] == [
        (True, True, True), (False, True, True), (True, False, True), (True, True, False), (True, False, False),
        (True, True, True), (True, True, True), (True, True, True)]
    aligned = ablation.experiment("Weather", 720, {"variant": "full + align"})
    assert (aligned.train.itm_weight, aligned.train.wpa_weight, aligned.train.forecast_loss) == (0.1, 0.1, "mse+mae")
    assert not aligned.train.shuffle_features
    control = ablation.experiment("Weather", 720, {"variant": "full + align, shuffled features"}).train
    assert (control.itm_weight, control.forecast_loss, control.shuffle_features) == (0.1, "mse+mae", True)
    mse_only = ablation.experiment("ETTh1", 96, {"variant": "full, mse loss"}).train
    assert (mse_only.itm_weight, mse_only.forecast_loss) == (0.0, "mse")
    assert ablation.experiment("ETTh1", 96, {"variant": "full"}).train.forecast_loss == "mse+mae"
    assert (aligned.data.percent, aligned.model.seq_len) == (10, 512)  # the paper's few-shot regime


@pytest.mark.parametrize("mutate,msg", [
    (lambda d: d.update(preset="paper"), "preset: unknown preset 'paper'; known: official, official_few_shot, official_zero_shot, long_input"),
    (lambda d: d.update(variants={"a": {"model.d_modle": 1}}), "variants.a.model.d_modle: unknown setting"),
    (lambda d: d.update(variants={"a": {"preset": "x"}}), "variants.a.preset: unknown preset 'x'"),
    (lambda d: d.update(variants={"a": 3}), "variants.a: must map section.key"),
    (lambda d: d.update(variants={"a": {"preset": "official"}}, datasets=["Weather"], horizons=[720]),
     "preset 'official' has no setting for Weather at horizon 720"),
])
def test_bad_variants_and_presets_are_named(mutate, msg):
    d = {"name": "v", "fixed": {"model": {"seq_len": 96}}, "searcher": "grid"}
    mutate(d)
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        parse_study(d)
