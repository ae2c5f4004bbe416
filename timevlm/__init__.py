"""Time-VLM (ICML 2025) as a plain-PyTorch library: data, model, metrics and a framework-free training loop.

No Ray or MLflow imports live here; `timevlm_platform` (in ``platform/``) drives this library.
"""
from timevlm.config import DataConfig, ModelConfig, TrainConfig

__all__ = ["DataConfig", "ModelConfig", "TrainConfig"]
__version__ = "0.1.0"
