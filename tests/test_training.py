"""The framework-free loop: a tiny real fit on ETTh1 learns, runs are reproducible, resume is exact."""
from __future__ import annotations

import copy

import torch

from timevlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from timevlm.experiment import prepare, run_experiment
from timevlm.training import NonFiniteLossError, fit


def tiny(shared_cache, **train) -> ExperimentConfig:
    return ExperimentConfig(
        model=ModelConfig(seq_len=48, pred_len=24, d_model=32, d_fusion=64, memory_size=8),
        data=DataConfig(dataset="ETTh1", max_windows=192),
        train=TrainConfig(**{"epochs": 4, "batch_size": 32, "progress": False, "cache_dir": shared_cache,
                             "num_threads": 1, "patience": 4, **train}))


def test_tiny_fit_on_etth1_lowers_validation_loss(data_dir, shared_cache):
    out = run_experiment(tiny(shared_cache))
    vals = [e["val_mse"] for e in out["history"]]
    assert len(vals) == 4
    assert min(vals[1:]) < vals[0]
    assert out["best_val_mse"] == min(vals)
    assert out["n_test_windows"] == 192 and 0 < out["test_mse"] < 5
    assert out["params_trainable"] == out["params_total"] > 0  # no frozen VLM weights inside the model


def test_two_runs_with_one_seed_are_identical_on_cpu(data_dir, shared_cache):
    a = run_experiment(tiny(shared_cache, epochs=2))
    b = run_experiment(tiny(shared_cache, epochs=2))
    c = run_experiment(tiny(shared_cache, epochs=2, seed=7))
    assert [e["train_loss"] for e in a["history"]] == [e["train_loss"] for e in b["history"]]
    assert a["test_mse"] == b["test_mse"]
    assert a["test_mse"] != c["test_mse"]


def test_resume_from_a_checkpoint_matches_an_uninterrupted_run(data_dir, shared_cache):
    cfg = tiny(shared_cache, epochs=3)
    states = []
    p = prepare(cfg, progress=False)
    full = fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
               val_feats=p.features["val"], on_epoch_end=lambda m, s, imp: states.append(copy.deepcopy(s)))  # = saving it
    p2 = prepare(cfg, progress=False)
    resumed = fit(p2.model, p2.splits["train"], p2.splits["val"], cfg.train, train_feats=p2.features["train"],
                  val_feats=p2.features["val"], resume=states[0])
    assert [h.val_mse for h in resumed.history] == [h.val_mse for h in full.history]


def test_early_stopping_keeps_the_best_epoch(data_dir, shared_cache, monkeypatch):
    """Validation scripted to improve twice and then get worse: with patience 2 the loop runs two more epochs,
    stops before the fifth, and hands back the weights it validated at epoch 2."""
    import timevlm.training as training

    scripted = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(training, "validate", lambda *a, **k: {"mse": next(scripted), "mae": 1.0})
    cfg = tiny(shared_cache, epochs=10, patience=2)
    p = prepare(cfg, progress=False)
    states = []
    r = fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
            val_feats=p.features["val"], on_epoch_end=lambda m, s, imp: states.append(copy.deepcopy(s)))
    assert r.stopped_early and [h.val_mse for h in r.history] == [3.0, 2.0, 2.5, 2.6]
    assert (r.best_epoch, r.best_val_mse) == (2, 2.0)
    assert [h.best_val_mse for h in r.history] == [3.0, 2.0, 2.0, 2.0]
    final = p.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in states[1].best_state.items())  # epoch 2's weights
    assert any(not torch.equal(final[k], v) for k, v in states[3].model.items() if k in final)  # not the last


def test_patience_is_not_reached_by_a_validation_that_keeps_improving(data_dir, shared_cache, monkeypatch):
    import timevlm.training as training

    scripted = iter([3.0, 2.9, 2.8])
    monkeypatch.setattr(training, "validate", lambda *a, **k: {"mse": next(scripted), "mae": 1.0})
    cfg = tiny(shared_cache, epochs=3, patience=1)
    p = prepare(cfg, progress=False)
    r = fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
            val_feats=p.features["val"])
    assert not r.stopped_early and (r.best_epoch, len(r.history)) == (3, 3)


def test_a_non_finite_loss_stops_training_naming_where(data_dir, shared_cache):
    cfg = tiny(shared_cache, epochs=3)
    p = prepare(cfg, progress=False)
    calls = []

    def poison(module, inputs, output):  # the third training forward of the second epoch returns NaN
        if module.training:
            calls.append(1)
            if len(calls) == len(p.splits["train"]) // cfg.train.batch_size + 3:
                return output * float("nan")
        return output

    p.model.register_forward_hook(poison)
    try:
        fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
            val_feats=p.features["val"])
        raise AssertionError("a NaN loss must raise")
    except NonFiniteLossError as e:
        assert "loss is nan at epoch 2, step 3" in str(e)
    with torch.no_grad():
        for prm in p.model.parameters():
            prm.fill_(float("nan"))
    try:
        fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
            val_feats=p.features["val"])
        raise AssertionError("NaN weights must raise")
    except NonFiniteLossError as e:
        assert "epoch 1, step 1" in str(e)


def test_validation_keeps_the_multimodal_residual_only_where_it_helps(data_dir, shared_cache):
    """A correction that hurts is closed on validation: the selected model then forecasts exactly what its
    temporal branch does, so the multimodal branch cannot make validation error worse than that."""
    from timevlm.training import evaluate, validate

    p = prepare(tiny(shared_cache), progress=False)
    model, val, feats = p.model, p.splits["val"], p.features["val"]
    with torch.no_grad():
        torch.nn.init.normal_(model.multimodal.correction[-1].weight, std=5.0)  # a harmful correction
    model.set_switch("residual_scale", 0.0)
    closed = evaluate(model, val, feats)["mse"]
    model.set_switch("residual_scale", 1.0)
    opened = evaluate(model, val, feats)["mse"]
    assert opened > closed
    scores = validate(model, val, feats, 256, torch.device("cpu"), False)
    assert scores["residual_scale"] == 0.0 and scores["mse"] == closed and model.switch_values["residual_scale"] == 0.0
    with torch.no_grad():
        model.multimodal.correction[-1].weight.zero_()  # a harmless one (zero): ties keep it open
    assert validate(model, val, feats, 256, torch.device("cpu"), False)["residual_scale"] == 1.0


def test_validation_scores_every_switch_combination_and_keeps_the_best(data_dir, shared_cache):
    """One forward pass per batch scores the patch head and the multimodal residual open and closed in all four
    combinations: the same numbers as evaluating the model at each, and the model is left at the best."""
    from timevlm.training import evaluate, validate

    p = prepare(tiny(shared_cache), progress=False)
    model, val, feats = p.model, p.splits["val"], p.features["val"]
    torch.manual_seed(0)
    with torch.no_grad():
        torch.nn.init.normal_(model.ral.head[-1].weight, std=0.02)
        torch.nn.init.normal_(model.multimodal.correction[-1].weight, std=0.5)
    scores = {}
    for head in (1.0, 0.0):
        for mm in (1.0, 0.0):
            model.set_switch("head_scale", head)
            model.set_switch("residual_scale", mm)
            scores[head, mm] = evaluate(model, val, feats)["mse"]
    assert len(set(scores.values())) == 4
    out = validate(model, val, feats, 256, torch.device("cpu"), False)
    best = min(scores, key=scores.get)
    assert (out["head_scale"], out["residual_scale"]) == best and out["mse"] == scores[best]
    assert model.switch_values == {"head_scale": best[0], "residual_scale": best[1]}


def test_weight_average_is_what_validation_scores_keeps_and_resumes(data_dir, shared_cache):
    cfg = tiny(shared_cache, epochs=3, ema_decay=0.9)
    states = []
    p = prepare(cfg, progress=False)
    full = fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
               val_feats=p.features["val"], on_epoch_end=lambda m, s, imp: states.append(copy.deepcopy(s)))
    best = states[full.best_epoch - 1]
    params = [k for k, _ in p.model.named_parameters()]
    for k in params:  # the kept weights are the average at the best epoch, not the weights trained to then
        assert torch.equal(best.best_state[k], best.ema[f"module.{k}"])
    assert any(not torch.equal(best.best_state[k], best.model[k]) for k in params)
    final = p.model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in best.best_state.items())
    p2 = prepare(cfg, progress=False)
    resumed = fit(p2.model, p2.splits["train"], p2.splits["val"], cfg.train, train_feats=p2.features["train"],
                  val_feats=p2.features["val"], resume=states[0])
    assert [h.val_mse for h in resumed.history] == [h.val_mse for h in full.history]


def test_weight_average_warms_up_its_decay():
    from timevlm.training import _ema_with_warmup

    update = _ema_with_warmup(0.99)
    avg, cur = [torch.zeros(3)], [torch.ones(3)]
    update(avg, cur, torch.tensor(1))  # decay min(0.99, 2/11): the average moves most of the way at first
    assert torch.allclose(avg[0], torch.full((3,), 9 / 11))
    update(avg, cur := [torch.zeros(3)], torch.tensor(10 ** 6))  # later: the full decay
    assert torch.allclose(avg[0], torch.full((3,), 9 / 11 * 0.99))


def test_train_step_fused_adamw_takes_the_same_steps_and_resumes_an_unfused_state():
    from timevlm.training import TrainStep

    torch.manual_seed(0)
    cfg = ModelConfig(seq_len=48, pred_len=24, d_model=32, d_fusion=64, memory_size=8, model="dlinear", n_vars=3)
    from timevlm.model.timevlm import build_model

    fused_model = build_model(cfg)
    plain_model = copy.deepcopy(fused_model)
    train = TrainConfig(lr=1e-2, weight_decay=0.01, ema_decay=None, forecast_loss="mse")
    step = TrainStep(fused_model, train, torch.device("cpu"))
    assert step.opt.param_groups[0]["fused"] is True  # torch's one-pass kernel on CPU
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=0.01)
    x, y = torch.randn(8, 48, 3), torch.randn(8, 24, 3)
    for _ in range(5):
        step.update(step.loss(x, None, y))
        plain.zero_grad()
        loss = torch.nn.functional.mse_loss(plain_model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(plain_model.parameters()), train.grad_clip)
        plain.step()
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a checkpoint written by the unfused optimiser (trials before the change) resumes into the fused one
    step.opt.load_state_dict(plain.state_dict())
    step.update(step.loss(x, None, y))
    assert all(torch.isfinite(p).all() for p in fused_model.parameters())


def test_resume_reads_checkpoints_written_with_a_data_parallel_wrappers_keys(data_dir, shared_cache):
    """Older data-parallel trials saved their best weights from the DDP wrapper ("module.*" keys); a trial resumed
    from such a checkpoint, data-parallel or not, must load them rather than fail at the end."""
    cfg = tiny(shared_cache, epochs=3)
    states = []
    p = prepare(cfg, progress=False)
    full = fit(p.model, p.splits["train"], p.splits["val"], cfg.train, train_feats=p.features["train"],
               val_feats=p.features["val"], on_epoch_end=lambda m, s, imp: states.append(copy.deepcopy(s)))
    old = states[0]
    old.model = {f"module.{k}": v for k, v in old.model.items()}
    old.best_state = {f"module.{k}": v for k, v in old.best_state.items()}
    p2 = prepare(cfg, progress=False)
    resumed = fit(p2.model, p2.splits["train"], p2.splits["val"], cfg.train, train_feats=p2.features["train"],
                  val_feats=p2.features["val"], resume=old)
    assert [h.val_mse for h in resumed.history] == [h.val_mse for h in full.history]
    for a, b in zip(p.model.state_dict().values(), p2.model.state_dict().values()):
        assert torch.equal(a, b)
