"""Datasets: registry of the benchmark sets, file loading and validation, split windows, M4."""
from timevlm.data.registry import DATASETS, DatasetSpec, get_dataset
from timevlm.data.splits import build_splits
from timevlm.data.windows import SplitData, make_loader

__all__ = ["DATASETS", "DatasetSpec", "get_dataset", "SplitData", "build_splits", "make_loader"]
