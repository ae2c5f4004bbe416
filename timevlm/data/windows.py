"""Split borders (the paper's protocol), train-only scaling, few-shot/zero-shot, sliding windows, loaders."""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timevlm.config import DataConfig
from timevlm.data.files import read_table
from timevlm.data.registry import DatasetSpec, get_dataset
from timevlm.errors import DataError

SPLITS = ("train", "val", "test")


def split_borders(spec: DatasetSpec, n_rows: int, seq_len: int) -> tuple[list[int], list[int]]:
    """(border1s, border2s) for train/val/test. Val and test windows start seq_len before their border."""
    if spec.split_rule in ("ett_hour", "ett_minute"):
        unit = 24 * 30 * (4 if spec.split_rule == "ett_minute" else 1)  # rows per 30-day month
        b2 = [12 * unit, 16 * unit, 20 * unit]
    elif spec.split_rule == "ratio":
        n_train, n_test = int(n_rows * 0.7), int(n_rows * 0.2)
        b2 = [n_train, n_rows - n_test, n_rows]
    else:
        raise DataError(f"{spec.name}: split rule {spec.split_rule!r} has no fixed borders (use timevlm.data.m4)")
    b1 = [0, b2[0] - seq_len, b2[1] - seq_len]
    return b1, b2


def few_shot_border(border1: int, border2: int, seq_len: int, percent: int) -> int:
    """The `first` cut (Time-LLM, OFA): the training split ends after the first `percent`% of its rows."""
    if percent >= 100:
        return border2
    return (border2 - seq_len) * percent // 100 + seq_len


def few_shot_sample(starts: np.ndarray, percent: int, seed: int, where: str) -> np.ndarray:
    """The `random` cut (the official Time-VLM code, data_factory.py): `n * percent // 100` of the `n` training
    windows, drawn with `seed` (a torch.randperm, as there), returned in time order."""
    keep = len(starts) * percent // 100
    if keep < 1:
        raise DataError(f"{where}: {percent}% of {len(starts)} training windows is no window")
    pick = torch.randperm(len(starts), generator=torch.Generator().manual_seed(seed))[:keep].numpy()
    return starts[np.sort(pick)]


@dataclass
class Scaler:
    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> "Scaler":
        std = x.std(axis=0)
        return cls(mean=x.mean(axis=0), std=np.where(std < 1e-8, 1.0, std))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.std).astype(np.float32)

    def inverse(self, x: np.ndarray) -> np.ndarray:
        return x * self.std + self.mean


@dataclass
class SplitData:
    """One split of one dataset: scaled values and the start row of every window."""

    dataset: str
    split: str
    values: np.ndarray  # [rows, n_vars], scaled, float32
    starts: np.ndarray  # window start rows into `values`
    seq_len: int
    pred_len: int
    scaler: Scaler
    description: str = ""
    # M4 only: the series of each window and that series' scaling (metrics undo it per window)
    series: np.ndarray | None = None
    series_mean: np.ndarray | None = None
    series_std: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def n_vars(self) -> int:
        return self.values.shape[1]

    def window(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(self.starts[i])
        return self.values[s:s + self.seq_len], self.values[s + self.seq_len:s + self.seq_len + self.pred_len]

    def subset(self, rows: np.ndarray | slice) -> SplitData:
        """The same split restricted to some windows (per-window M4 fields follow their windows)."""
        pick = (lambda a: None if a is None else a[rows])
        return replace(self, starts=self.starts[rows], series=pick(self.series),
                       series_mean=pick(self.series_mean), series_std=pick(self.series_std))

    def inputs(self, idx: np.ndarray) -> torch.Tensor:
        """Batch of input windows [len(idx), seq_len, n_vars] for the given window indices."""
        rows = self.starts[idx][:, None] + np.arange(self.seq_len)[None, :]
        return torch.from_numpy(self.values[rows])


class WindowDataset(Dataset):
    def __init__(self, data: SplitData) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        x, y = self.data.window(i)
        return i, torch.from_numpy(x), torch.from_numpy(y)


def _windows(n_rows: int, seq_len: int, pred_len: int, where: str) -> np.ndarray:
    n = n_rows - seq_len - pred_len + 1
    if n <= 0:
        raise DataError(f"{where}: {n_rows} rows, too short for seq_len {seq_len} + pred_len {pred_len} "
                        f"(needs at least {seq_len + pred_len})")
    return np.arange(n)


def subsample(starts: np.ndarray, max_windows: int | None) -> np.ndarray:
    if max_windows is None or len(starts) <= max_windows:
        return starts
    return starts[np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]


def load_split(name: str, split: str, seq_len: int, pred_len: int, cfg: DataConfig,
               seed: int | None = None) -> SplitData:
    """One split's windows. A few-shot training split (`cfg.percent` < 100) is cut as `cfg.few_shot` says; the
    random cut draws with `seed` (the run's train.seed), which it then requires."""
    spec = get_dataset(name)
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
    raw = read_table(spec, cfg.data_dir)
    b1s, b2s = split_borders(spec, len(raw), seq_len)
    if b2s[-1] > len(raw):
        raise DataError(f"{spec.file}: {len(raw)} rows, but the {spec.name} protocol needs {b2s[-1]} rows")
    scaler = Scaler.fit(raw[b1s[0]:b2s[0]])
    k = SPLITS.index(split)
    b1, b2 = b1s[k], b2s[k]
    random_cut = split == "train" and cfg.percent < 100 and cfg.few_shot == "random"
    if split == "train" and cfg.few_shot == "first":
        b2 = few_shot_border(b1, b2, seq_len, cfg.percent)
    if b1 < 0:
        raise DataError(f"{spec.file}: seq_len {seq_len} reaches before the first row of the {split} split")
    values = scaler.transform(raw[b1:b2])
    where = f"{spec.file} ({split} split)"
    starts = _windows(len(values), seq_len, pred_len, where)
    if random_cut:
        if seed is None:
            raise DataError(f"{where}: the random few-shot cut draws its windows with the run's seed; none given")
        starts = few_shot_sample(starts, cfg.percent, seed, where)
    starts = subsample(starts, cfg.max_windows)
    return SplitData(spec.name, split, values, starts, seq_len, pred_len, scaler, spec.description)


def make_loader(data: SplitData, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    """Training: shuffled with a seeded generator, drop_last. Evaluation: in order, drop_last=False."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(WindowDataset(data), batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(data) > batch_size, generator=gen, num_workers=0)
