"""The step's fast building blocks behave as the PyTorch modules they replace, and the int8 text encoder is a
separate, close, cache-keyed build."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from timevlm.config import ModelConfig
from timevlm.errors import ConfigError
from timevlm.model.layers import Dropout, multihead_attention
from timevlm.model.multimodal import encoder_settings
from timevlm.model.ral import LocalAttention


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_dropout_keeps_one_minus_p_and_preserves_the_mean(p):
    torch.manual_seed(0)
    y = Dropout(p).train()(torch.ones(1000, 1000))
    assert (y > 0).float().mean().item() == pytest.approx(1 - p, abs=2e-3)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / (1 - p))]
    assert y.mean().item() == pytest.approx(1.0, abs=3e-3)


def test_dropout_is_seeded_identity_in_eval_and_passes_gradients():
    d = Dropout(0.5).train()
    torch.manual_seed(3)
    a = d(torch.ones(64))
    torch.manual_seed(3)
    assert torch.equal(a, d(torch.ones(64)))
    assert not torch.equal(a, d(torch.ones(64)))  # a fresh mask per call
    x = torch.randn(10, 8)
    assert torch.equal(d.eval()(x), x) and torch.equal(Dropout(0.0).train()(x), x)
    x.requires_grad_(True)
    y = d.train()(x)
    y.sum().backward()
    assert torch.equal(x.grad, (y.detach() != 0).float() * 2.0)  # gradient flows through kept elements only


def test_multihead_attention_matches_nn_multihead_attention():
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    q, kv = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    torch.testing.assert_close(multihead_attention(attn, q, kv), attn(q, kv, kv, need_weights=False)[0])
    torch.testing.assert_close(multihead_attention(attn, q, q), attn(q, q, q, need_weights=False)[0])


def test_local_attention_is_a_pre_norm_encoder_layer_with_its_state_dict():
    torch.manual_seed(0)
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.1, batch_first=True,
                                     norm_first=True).eval()
    new = LocalAttention(32, 4)
    new.load_state_dict(ref.state_dict())  # same parameter names: strict load
    x = torch.randn(5, 65, 32)
    torch.testing.assert_close(new(x), ref(x))
    # training: the reference's gradients (its dropouts off)
    ref = nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=True)
    new.load_state_dict(ref.state_dict())
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    new.train()(xa).square().sum().backward()
    ref.train()(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    for (name, a), b in zip(new.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_int8_text_encoder_is_its_own_cache_entry_and_close_to_fp32():
    with pytest.raises(ConfigError, match="vlm_int8"):
        ModelConfig(vlm="clip", vlm_int8=True)
    fp32, int8 = ModelConfig(n_vars=7, periodicity=24), ModelConfig(n_vars=7, periodicity=24, vlm_int8=True)
    assert encoder_settings(fp32) != encoder_settings(int8)
    from timevlm.model.vlm import load_vlm

    prompts = ["min -1.04 max 1.26 median 0.01 last -0.22 change +0.12 lags 24 48 23; forecast 96 steps from 512.",
               "min 0.31 max 2.90 median 1.20 last 2.75 change +1.96 lags 1 2 3; forecast 96 steps from 512."]
    images = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        v32, t32 = load_vlm(fp32).encode(images, prompts)
        adapter = load_vlm(int8)
        v8, t8 = adapter.encode(images, prompts)
    assert any("quantized" in type(m).__module__ for m in adapter.text.modules())
    torch.testing.assert_close(v8, v32)  # only the text encoder is quantised
    cos = torch.nn.functional.cosine_similarity(t8.flatten(1), t32.flatten(1))
    assert cos.min().item() > 0.9 and not torch.equal(t8, t32)  # close, not equal: its own cache entry


def test_text_features_do_not_depend_on_the_batch_its_order_or_padding(monkeypatch):
    """Prompts are encoded in order of length, in chunks padded to their own longest: each prompt's features are
    what it gets encoded alone, wherever it sits in the batch."""
    from timevlm.model.vlm import custom, load_vlm

    monkeypatch.setattr(custom, "CPU_CHUNK", 2)
    adapter = load_vlm(ModelConfig(n_vars=7, periodicity=24))
    prompts = ["min 0.31 max 2.90 median 1.20 last 2.75 change +1.96 lags 1 2 3; forecast 96 steps from 512.",
               "min -1.04 max 1.26; forecast 96 steps.", "min 1.00 max 1.00",
               "min -12.04 max 11.26 median -0.01 last -0.22 change -10.12 lags 24 48 23; forecast 96 steps (1h) "
               "from 512.", "forecast 96 steps from 96."]
    cpu = torch.device("cpu")
    with torch.inference_mode():
        alone = torch.cat([adapter._encode_text([p], cpu) for p in prompts])
        together = adapter._encode_text(prompts, cpu)
        backwards = adapter._encode_text(prompts[::-1], cpu).flip(0)
    assert together.shape == (5, adapter.text_dim)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backwards, together, atol=1e-5, rtol=1e-5)
    assert torch.nn.functional.cosine_similarity(together[0], together[1], dim=0) < 0.999  # not one row repeated
