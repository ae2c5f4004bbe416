"""Locating, downloading and validating data files. Every failure names the file and the problem."""
from __future__ import annotations

import hashlib
import os
import urllib.request
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from timevlm.data.registry import DatasetSpec, get_dataset
from timevlm.errors import DataError

DATA_DIR_ENV = "TIMEVLM_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """Explicit argument, else $TIMEVLM_DATA_DIR, else the bundled ../shared/data beside the repo or cwd."""
    if data_dir:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    for base in (_REPO_ROOT, Path.cwd()):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand.is_dir():
            return cand
    return (Path.cwd() / "data").resolve()


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Download a dataset that has a public direct URL into the data directory and verify its MD5."""
    spec = get_dataset(name)
    if spec.url is None:
        raise DataError(f"{name} has no direct download; fetch {spec.file} by hand (README, 'Data') "
                        f"into {resolve_data_dir(data_dir)}")
    dest = resolve_data_dir(data_dir) / spec.file
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    urllib.request.urlretrieve(spec.url, tmp)
    if spec.md5 and md5sum(tmp) != spec.md5:
        tmp.unlink()
        raise DataError(f"{spec.url}: checksum mismatch (expected md5 {spec.md5})")
    tmp.replace(dest)
    return dest


def dataset_path(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> Path:
    path = resolve_data_dir(data_dir) / spec.file
    if not path.is_file():
        how = (f"run `python -m timevlm.data.download {spec.name}`" if spec.url
               else "download it by hand (README, 'Data')")
        raise DataError(f"{path}: data file for {spec.name} not found; set ${DATA_DIR_ENV} to the folder "
                        f"that holds {spec.file}, or {how}")
    return path


def read_table(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> np.ndarray:
    """The value columns of a long-horizon dataset as float32 [T, n_vars], checked for shape and NaNs."""
    path = dataset_path(spec, data_dir)
    return _read_table_cached(str(path), path.stat().st_mtime_ns, spec)


def value_columns(spec: DatasetSpec, data_dir: str | os.PathLike | None = None) -> list[str]:
    """The names of the value columns `read_table` returns, in its order (the file's header, without `date`)."""
    if spec.columns is not None:
        return list(spec.columns)
    if spec.split_rule == "m4":
        return ["value"]
    return [c for c in pd.read_csv(dataset_path(spec, data_dir), nrows=0).columns if c != "date"]


@lru_cache(maxsize=8)
def _read_table_cached(path: str, _mtime: int, spec: DatasetSpec) -> np.ndarray:
    try:
        df = pd.read_csv(path)
    except Exception as e:  # unreadable / not a CSV
        raise DataError(f"{path}: cannot be read as CSV ({e})") from e
    if "date" not in df.columns:
        raise DataError(f"{path}: missing the 'date' column; columns are {list(df.columns)[:10]}")
    values = df.drop(columns=["date"])
    if spec.columns is not None:
        missing = [c for c in spec.columns if c not in values.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing} expected for {spec.name}; "
                            f"found {list(values.columns)}")
        values = values[list(spec.columns)]
    if values.shape[1] != spec.n_vars:
        raise DataError(f"{path}: expected {spec.n_vars} value columns for {spec.name}, found {values.shape[1]}")
    non_numeric = [c for c in values.columns if not pd.api.types.is_numeric_dtype(values[c])]
    if non_numeric:
        raise DataError(f"{path}: non-numeric value column(s) {non_numeric}")
    arr = values.to_numpy(dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))
        row, col = int(bad[0, 0]), int(bad[0, 1])
        raise DataError(f"{path}: {len(bad)} NaN/inf value(s), first at data row {row + 1} "
                        f"column {values.columns[col]!r}")
    return arr
