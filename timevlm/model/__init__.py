"""Time-VLM: RAL (temporal memory), VAL (series -> image), TAL (series -> prompt), frozen VLM, gated fusion."""
from timevlm.model.timevlm import TimeVLM, build_model

__all__ = ["TimeVLM", "build_model"]
