"""timevlm_platform: Ray Train workers + Ray Tune/Optuna search + MLflow tracking for Time-VLM.

Lives in the repository's `platform/` folder, which deliberately has no __init__.py so that it can never
shadow the standard library's `platform` module.
"""
__version__ = "0.1.0"
