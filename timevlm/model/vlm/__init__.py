"""Frozen vision-language models behind one adapter interface, selected by name from a registry."""
from timevlm.model.vlm.base import VLM_ADAPTERS, VLMAdapter, load_vlm
from timevlm.model.vlm import custom, hf  # noqa: F401  (registers the variants)

__all__ = ["VLM_ADAPTERS", "VLMAdapter", "load_vlm"]
