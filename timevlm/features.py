"""Feature cache: the frozen VLM's outputs for every window of a split, computed once and stored as Parquet.

Key = hash of everything that changes the features: the encoder settings (VAL/TAL code version, image and
prompt settings, VLM variant, weights identity), the dataset, the split, and the exact windows (content hash
of the scaled values and of the window starts, so few-shot percent, seq_len and data edits all count).

Storage is a local directory or any fsspec URI (s3://, gs://, ...) given by `root`; on a cluster point it at
shared storage. Concurrent builders on one node take a file lock, so an entry is computed once; an entry is
written to a temporary name and renamed into place, so a half-written entry is never read. (Across nodes,
two nodes may build the same entry at once; both write identical content atomically.)
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from timevlm.data.windows import SplitData
from timevlm.errors import CacheError
from timevlm.model.multimodal import Features, MultimodalEncoder

CACHE_DIR_ENV = "TIMEVLM_CACHE_DIR"


def resolve_cache_root(root: str | None = None, home: Path | None = None) -> str:
    """Where the feature cache lives: `root`, else $TIMEVLM_CACHE_DIR, else feature_cache/ under `home` (a
    platform's home folder; the current directory without one). The only place this is decided."""
    return root or os.environ.get(CACHE_DIR_ENV) or str((home or Path.cwd()) / "feature_cache")


def cache_key(settings: dict, split: SplitData) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    h.update(f"|{split.dataset}|{split.split}|{split.seq_len}|{split.pred_len}|".encode())
    h.update(np.ascontiguousarray(split.values).tobytes())
    h.update(np.ascontiguousarray(split.starts).tobytes())
    return f"{split.dataset}-{split.split}-L{split.seq_len}-{h.hexdigest()[:20]}"


@dataclass
class CacheStats:
    hits: int = 0
    builds: int = 0
    build_seconds: float = 0.0
    keys: list[str] = field(default_factory=list)


class FeatureCache:
    """`fallback="memory"`: when an entry cannot be written, keep the features it computed in memory for this
    run (with a warning) instead of failing; "error" (default): fail with the path named."""

    def __init__(self, root: str | None = None, fallback: str = "error") -> None:
        self.root = resolve_cache_root(root).rstrip("/")
        self.fallback = fallback
        self.fs, self.base = fsspec.core.url_to_fs(self.root)
        created = True
        try:
            self.fs.makedirs(self.base, exist_ok=True)
        except Exception as e:  # noqa: BLE001
            self._cannot_write(e, "create")
            created = False
        local = isinstance(self.fs, fsspec.implementations.local.LocalFileSystem)
        self.lock_dir = (Path(self.base) if local and created
                         else Path(tempfile.gettempdir()) / "timevlm-cache-locks")
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self.stats = CacheStats()

    def path(self, key: str) -> str:
        return f"{self.base}/{key}.parquet"

    def exists(self, key: str) -> bool:
        return self.fs.exists(self.path(key))

    def get_or_build(self, settings: dict, split: SplitData,
                     make_encoder: Callable[[], MultimodalEncoder], batch_size: int = 256,
                     progress: bool = True) -> SplitFeatures:
        """Load the split's features, building them first (once, under a lock) if they are missing.
        `make_encoder` is called only on a miss, so cache hits never load the VLM."""
        key = cache_key(settings, split)
        self.stats.keys.append(key)
        if not self.exists(key):
            with self.lock(key):
                if not self.exists(key):  # another process may have built it while we waited
                    t0 = time.perf_counter()
                    feats = build_features(make_encoder(), split, batch_size, progress)
                    try:
                        self._write(key, feats, settings)
                    except Exception as e:  # noqa: BLE001
                        self._cannot_write(e, "write", key)
                    self.stats.builds += 1
                    self.stats.build_seconds += time.perf_counter() - t0
                    return feats
        self.stats.hits += 1
        return self._read(key)

    def lock(self, key: str) -> FileLock:
        """The lock an entry is built under (by a trial's get_or_build or a study's up-front build)."""
        return FileLock(str(self.lock_dir / f"{key}.lock"))

    def _cannot_write(self, e: Exception, what: str, key: str | None = None) -> None:
        where = self.path(key) if key else self.root
        msg = f"feature cache {where}: cannot {what} it ({type(e).__name__}: {e})"
        if self.fallback != "memory":
            raise CacheError(f"{msg}; make {self.root} writable, point train.cache_dir (--cache-dir) elsewhere, "
                             f"or set train.cache_fallback=memory to compute the features in memory") from e
        warnings.warn(f"{msg}; computing features in memory for this run (train.cache_fallback=memory)",
                      stacklevel=3)

    def keys(self) -> set[str]:
        """Every complete entry in the cache, from one directory listing (temporary files excluded)."""
        names = (p.rsplit("/", 1)[-1] for p in self.fs.ls(self.base, detail=False))
        return {n[:-len(".parquet")] for n in names if n.endswith(".parquet") and not n.startswith(".")}

    def put(self, key: str, feats: "SplitFeatures", settings: dict) -> None:
        """Store an entry computed elsewhere (e.g. by a distributed batch job), atomically."""
        self._write(key, feats, settings)
        self.stats.builds += 1

    def _write(self, key: str, feats: "SplitFeatures", settings: dict) -> None:
        n = len(feats.vision)
        table = pa.table({
            "window": pa.array(np.arange(n, dtype=np.int64)),
            "vision": pa.FixedSizeListArray.from_arrays(pa.array(feats.vision.reshape(-1).numpy()),
                                                        feats.vision[0].numel()),
            "text": pa.FixedSizeListArray.from_arrays(pa.array(feats.text.reshape(-1).numpy()),
                                                      feats.text[0].numel()),
        }).replace_schema_metadata({
            "settings": json.dumps(settings, sort_keys=True, default=str),
            "vision_shape": json.dumps(list(feats.vision.shape[1:])),
            "text_shape": json.dumps(list(feats.text.shape[1:])),
        })
        tmp = f"{self.base}/.{key}.{uuid.uuid4().hex}.tmp"
        try:
            with self.fs.open(tmp, "wb") as f:
                pq.write_table(table, f)
            self.fs.mv(tmp, self.path(key))  # readers only ever see a complete entry
        except BaseException:
            try:  # a write that failed part-way leaves no half entry behind (and never under the entry's name)
                self.fs.rm(tmp)
            except Exception:  # noqa: BLE001
                pass
            raise

    def _read(self, key: str) -> SplitFeatures:
        with self.fs.open(self.path(key), "rb") as f:
            table = pq.read_table(f)
        meta = table.schema.metadata
        vshape, tshape = json.loads(meta[b"vision_shape"]), json.loads(meta[b"text_shape"])

        def col(name: str, shape: list[int]) -> torch.Tensor:
            flat = table.column(name).combine_chunks().flatten().to_numpy()
            return torch.from_numpy(flat.reshape(len(table), *shape).copy())

        return SplitFeatures(col("vision", vshape), col("text", tshape))


@dataclass
class SplitFeatures:
    vision: torch.Tensor  # [n_windows, Kv, Dv]
    text: torch.Tensor  # [n_windows, Kt, Dt]

    def batch(self, idx: torch.Tensor) -> Features:
        return {"vision": self.vision[idx], "text": self.text[idx]}

    def subset(self, rows: slice) -> SplitFeatures:
        return SplitFeatures(self.vision[rows], self.text[rows])

    def shuffled(self, seed: int) -> SplitFeatures:
        """The same rows in a random order (one permutation for vision and text, from `seed`): window i gets
        another window's features, which stay a matched image-prompt pair."""
        perm = torch.randperm(len(self.vision), generator=torch.Generator().manual_seed(seed))
        return SplitFeatures(self.vision[perm], self.text[perm])


def build_features(encoder: MultimodalEncoder, split: SplitData, batch_size: int = 256,
                   progress: bool = True) -> SplitFeatures:
    vis, txt = [], []
    order = np.arange(len(split))
    for lo in tqdm(range(0, len(order), batch_size), disable=not progress,
                   desc=f"VLM features {split.dataset}/{split.split}", unit="batch"):
        f = encoder(split.inputs(order[lo:lo + batch_size]))
        vis.append(f["vision"].cpu())
        txt.append(f["text"].cpu())
    return SplitFeatures(torch.cat(vis), torch.cat(txt))
