"""The alignment losses (ITM, WPA with IPOT) and the forecast loss on constructed cases, and their place in the
training step: off by default, a step is the same computation as without them."""
from __future__ import annotations

import pytest
import torch

from timevlm.config import ModelConfig, TrainConfig
from timevlm.errors import ConfigError
from timevlm.losses.forecast import forecast_loss
from timevlm.losses.itm import ImageTextMatching
from timevlm.losses.wpa import cosine_cost, ipot, wpa_loss
from timevlm.model import build_model
from timevlm.training import TrainStep, make_optimizer

CFG = ModelConfig(seq_len=96, pred_len=24, n_vars=3, periodicity=24, d_model=32, d_fusion=64, memory_size=8)


def batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(b, 96, 3, generator=g), torch.randn(b, 24, 3, generator=g)
    return x, {"vision": torch.randn(b, 4, 1280, generator=g), "text": torch.randn(b, 1, 384, generator=g)}, y


def test_ipot_plan_has_the_marginals_and_finds_the_matching():
    cost = torch.rand(3, 5, 7, generator=torch.Generator().manual_seed(1))
    plan = ipot(cost, iters=200)
    assert plan.shape == (3, 5, 7) and (plan >= 0).all()
    torch.testing.assert_close(plan.sum(1), torch.full((3, 7), 1 / 7))  # columns: exact after the last step
    torch.testing.assert_close(plan.sum(2), torch.full((3, 5), 1 / 5), atol=1e-4, rtol=0)
    # a cost that is zero on a permutation: the exact OT plan is that permutation (IPOT, not entropic smoothing)
    perm = torch.tensor([2, 0, 3, 1])
    cost = torch.ones(1, 4, 4)
    cost[0, torch.arange(4), perm] = 0.0
    plan = ipot(cost, iters=100)
    assert torch.equal(plan[0].argmax(1), perm) and plan[0, torch.arange(4), perm].min() > 0.24


def test_wpa_is_near_zero_for_a_windows_own_tokens_and_larger_for_another_windows():
    g = torch.Generator().manual_seed(0)
    vision = torch.randn(6, 4, 32, generator=g)
    text = vision[:, torch.randperm(4, generator=g)]  # the same tokens in another order: OT matches them
    own = wpa_loss(text, vision)
    other = wpa_loss(text.roll(1, 0), vision)  # each window's text against the next window's patches
    assert own < 0.01 and other > 0.5
    assert cosine_cost(vision, vision).diagonal(dim1=1, dim2=2).abs().max() < 1e-5


def test_itm_learns_to_tell_a_windows_own_pair_from_a_mismatched_one():
    torch.manual_seed(0)
    shared = torch.randn(64, 1, 16)  # what a window's two views have in common
    vision = shared + 0.3 * torch.randn(64, 4, 16)
    text = shared + 0.3 * torch.randn(64, 1, 16)
    itm = ImageTextMatching(16)
    opt = torch.optim.Adam(itm.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = itm(vision, text)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.6 and sum(losses[-10:]) / 10 < 0.3
    assert itm(vision[:1], text[:1]).item() == 0.0  # a batch of one has no other window to mismatch with
    with pytest.raises(ValueError, match="mismatched share"):
        ImageTextMatching(16, mismatched=1.0)


def test_forecast_loss_mse_plus_mae():
    pred, y = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.0, 0.0]])
    assert forecast_loss(pred, y).item() == pytest.approx(2.5)
    assert forecast_loss(pred, y, "mse+mae").item() == pytest.approx(2.5 + 1.5)
    with pytest.raises(ConfigError, match="forecast_loss must be mse, mse\\+mae or auto"):
        TrainConfig(forecast_loss="mae")
    with pytest.raises(ConfigError, match="itm_weight and wpa_weight must be >= 0"):
        TrainConfig(itm_weight=-1.0)


def test_with_the_defaults_a_training_step_is_bit_identical_to_a_plain_mse_step():
    def opened():  # built twice, not deep-copied: a copy loses the head's `lr_scale`
        torch.manual_seed(0)
        model = build_model(CFG)
        torch.nn.init.normal_(model.multimodal.correction[-1].weight, std=0.2)  # the branch open, as trained
        return model

    model, reference = opened(), opened()
    cfg = TrainConfig(ema_decay=None, forecast_loss="mse")
    step = TrainStep(model, cfg, torch.device("cpu"))
    assert step.alignment is None and len(step.params) == len(list(reference.parameters()))
    opt = make_optimizer(list(reference.parameters()), cfg, torch.device("cpu"))
    for seed in range(3):
        x, feats, y = batch(seed=seed)
        torch.manual_seed(seed)  # the same dropout masks in both
        step.update(step.loss(x, feats, y))
        torch.manual_seed(seed)
        loss = torch.nn.functional.mse_loss(reference(x, feats), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(reference.parameters()), cfg.grad_clip)
        opt.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(a, b), name


def test_alignment_losses_train_the_projections_and_their_own_classifier():
    torch.manual_seed(0)
    model = build_model(CFG)
    step = TrainStep(model, TrainConfig(ema_decay=None, forecast_loss="mse", itm_weight=0.5, wpa_weight=0.5), torch.device("cpu"))
    x, feats, y = batch()
    loss = step.loss(x, feats, y)
    assert set(step.parts) == {"itm", "wpa"} and all(p > 0 for p in step.parts.values())
    step.update(loss)
    mm = model.multimodal
    # the correction head starts at zero, so the forecast alone gives the projections no gradient: this is the
    # alignment's
    assert mm.vision_proj[1].weight.grad.abs().sum() > 0 and mm.text_proj[1].weight.grad.abs().sum() > 0
    assert step.alignment.itm.classifier.weight.grad.abs().sum() > 0
    assert any(step.alignment.itm.classifier.weight is p for g in step.opt.param_groups for p in g["params"])
    with pytest.raises(ValueError, match="needs both its vision and text learners"):
        TrainStep(build_model(ModelConfig(**{**CFG.__dict__, "use_tal": False})),
                  TrainConfig(itm_weight=0.5).resolved("timevlm"), torch.device("cpu"))
