"""CLIP, ViLT and BLIP-2 through transformers' `from_pretrained` (a hub id, or a local directory offline).

`vlm_path` selects the weights; defaults are the checkpoints the paper used. Each adapter needs a tokenizer
saved beside the model (as the hub repositories have).
"""
from __future__ import annotations

from pathlib import Path

import torch

from timevlm.config import ModelConfig
from timevlm.model.vlm.base import VLM_ADAPTERS, VLMAdapter, file_fingerprint, masked_mean

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _HFAdapter(VLMAdapter):
    default_path = ""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        from transformers import AutoTokenizer

        self.path = cfg.vlm_path or self.default_path
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.model = self._load(self.path)
        self.input_size = self.native_size(cfg)

    def _load(self, path: str):
        raise NotImplementedError

    @classmethod
    def _config(cls, cfg: ModelConfig):
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.vlm_path or cls.default_path)

    @classmethod
    def dims(cls, cfg: ModelConfig) -> tuple[int, int]:
        return cls._dims_from_config(cls._config(cfg))

    @staticmethod
    def _dims_from_config(c) -> tuple[int, int]:
        raise NotImplementedError

    @classmethod
    def native_size(cls, cfg: ModelConfig) -> int:
        c = cls._config(cfg)
        return cfg.vlm_input_size or int(getattr(c, "vision_config", c).image_size)

    @classmethod
    def weights_id(cls, cfg: ModelConfig) -> str:
        path = cfg.vlm_path or cls.default_path
        local = Path(path)
        if local.is_dir():
            files = [p for p in local.iterdir() if p.suffix in (".safetensors", ".bin")]
            return f"{cls.name}-{file_fingerprint(files)}"
        return f"{cls.name}-{path}@{getattr(cls._config(cfg), '_commit_hash', None) or 'unknown'}"

    def _tokenize(self, prompts: list[str], device: torch.device):
        return self.tokenizer(prompts, return_tensors="pt", padding="max_length", truncation=True,
                              max_length=self.max_tokens).to(device)


@VLM_ADAPTERS.register("clip")
class CLIPAdapter(_HFAdapter):
    name = "clip"
    default_path = "openai/clip-vit-base-patch32"
    mean, std = CLIP_MEAN, CLIP_STD

    def _load(self, path: str):
        from transformers import CLIPModel

        model = CLIPModel.from_pretrained(path)
        self.vision_dim, self.text_dim = self._dims_from_config(model.config)
        self.max_tokens = min(self.max_tokens, model.config.text_config.max_position_embeddings)
        return model

    @staticmethod
    def _dims_from_config(c) -> tuple[int, int]:
        return c.vision_config.hidden_size, c.text_config.hidden_size

    def encode(self, images, prompts):
        out = self.model.vision_model(pixel_values=self.preprocess(images))
        vision = self.pool_tokens(out.last_hidden_state[:, 1:])  # patch tokens, CLS dropped
        tok = self._tokenize(prompts, images.device)
        text = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        return vision, text.pooler_output.unsqueeze(1)


@VLM_ADAPTERS.register("vilt")
class ViLTAdapter(_HFAdapter):
    """ViLT fuses image and text in one transformer; both outputs come from its joint last layer."""

    name = "vilt"
    default_path = "dandelin/vilt-b32-finetuned-coco"
    mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    def _load(self, path: str):
        from transformers import ViltModel

        model = ViltModel.from_pretrained(path)
        self.vision_dim, self.text_dim = self._dims_from_config(model.config)
        self.max_tokens = min(self.max_tokens, model.config.max_position_embeddings)
        return model

    @staticmethod
    def _dims_from_config(c) -> tuple[int, int]:
        return c.hidden_size, c.hidden_size


    def encode(self, images, prompts):
        tok = self._tokenize(prompts, images.device)
        pix = self.preprocess(images)
        out = self.model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], pixel_values=pix,
                         pixel_mask=torch.ones(pix.shape[0], *pix.shape[2:], dtype=torch.long, device=pix.device))
        t = tok["input_ids"].shape[1]
        hidden = out.last_hidden_state
        text = masked_mean(hidden[:, :t], tok["attention_mask"]).unsqueeze(1)
        vision = self.pool_tokens(hidden[:, t + 1:])  # image patch tokens (image CLS dropped)
        return vision, text


@VLM_ADAPTERS.register("blip2")
class BLIP2Adapter(_HFAdapter):
    """Vision: the Q-Former's query outputs. Text: the language model's last hidden layer, mean-pooled."""

    name = "blip2"
    default_path = "Salesforce/blip2-opt-2.7b"
    mean, std = CLIP_MEAN, CLIP_STD

    def _load(self, path: str):
        from transformers import Blip2Model

        model = Blip2Model.from_pretrained(path)
        self.vision_dim, self.text_dim = self._dims_from_config(model.config)
        return model

    @staticmethod
    def _dims_from_config(c) -> tuple[int, int]:
        return c.qformer_config.hidden_size, c.text_config.hidden_size

    def encode(self, images, prompts):
        q = self.model.get_qformer_features(pixel_values=self.preprocess(images))
        q = q if isinstance(q, torch.Tensor) else q.last_hidden_state
        vision = self.pool_tokens(q)
        tok = self._tokenize(prompts, images.device)
        lm = self.model.language_model
        if self.model.config.use_decoder_only_language_model:
            hidden = lm(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"],
                        output_hidden_states=True).hidden_states[-1]
        else:
            hidden = lm.get_encoder()(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
        return vision, masked_mean(hidden, tok["attention_mask"]).unsqueeze(1)
