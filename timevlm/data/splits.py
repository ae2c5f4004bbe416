"""A dataset's train/val/test splits for a run: the fixed or ratio borders (windows.py) or M4's per-series
protocol (m4.py), chosen by the dataset's split rule. Neither of those modules imports this one."""
from __future__ import annotations

from timevlm.config import DataConfig
from timevlm.data.m4 import m4_splits
from timevlm.data.registry import get_dataset
from timevlm.data.windows import SplitData, load_split
from timevlm.errors import DataError


def build_splits(cfg: DataConfig, seq_len: int, pred_len: int, seed: int | None = None) -> dict[str, SplitData]:
    """train/val from `cfg.dataset`; test from `cfg.test_dataset` when given (zero-shot). M4 sets use
    their own per-series protocol (timevlm.data.m4). `seed` (the run's train.seed) draws the random few-shot
    cut; val and test never depend on it."""
    if get_dataset(cfg.dataset).split_rule == "m4":
        return m4_splits(cfg.dataset, seq_len, pred_len, cfg)
    out = {s: load_split(cfg.dataset, s, seq_len, pred_len, cfg, seed) for s in ("train", "val")}
    out["test"] = load_split(cfg.test_dataset or cfg.dataset, "test", seq_len, pred_len, cfg)
    if out["test"].n_vars != out["train"].n_vars:
        raise DataError(f"zero-shot {cfg.dataset} -> {cfg.test_dataset}: variable counts differ "
                        f"({out['train'].n_vars} vs {out['test'].n_vars})")
    return out
