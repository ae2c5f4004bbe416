"""The VLM feature cache: same predictions as the per-step path, hits instead of recomputing, one builder
under concurrency, never a half-written entry, any fsspec filesystem."""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from timevlm.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from timevlm.data.windows import load_split
from timevlm.experiment import prepare
from timevlm.features import FeatureCache, cache_key
from timevlm.training import predict


def _cfg(cache_dir, use_cache=True):
    return ExperimentConfig(
        model=ModelConfig(seq_len=48, pred_len=24, d_model=32, d_fusion=64, memory_size=8),
        data=DataConfig(dataset="ETTh1", max_windows=64),
        train=TrainConfig(progress=False, cache_dir=str(cache_dir), use_feature_cache=use_cache))


def test_cached_and_per_step_paths_give_the_same_predictions(data_dir, tmp_path):
    cached = prepare(_cfg(tmp_path), progress=False)
    uncached = prepare(_cfg(tmp_path, use_cache=False), progress=False)
    assert cached.features["val"] is not None and uncached.features["val"] is None
    uncached.model.load_state_dict(cached.model.state_dict())
    a, _ = predict(cached.model, cached.splits["val"], cached.features["val"], batch_size=16)
    b, _ = predict(uncached.model, uncached.splits["val"], None, batch_size=16)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_second_trial_reads_the_cache(data_dir, tmp_path, monkeypatch):
    first = prepare(_cfg(tmp_path), progress=False)
    assert first.cache_info["cache_builds"] == 3 and first.cache_info["cache_hits"] == 0
    # a second trial with other norm_const / d_model / d_fusion shares every entry and never loads the VLM
    import timevlm.experiment as experiment

    monkeypatch.setattr(experiment, "load_vlm", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, norm_const=1.0, d_model=64, d_fusion=32))
    second = prepare(cfg, progress=False)
    assert second.cache_info["cache_builds"] == 0 and second.cache_info["cache_hits"] == 3
    torch.testing.assert_close(second.features["train"].vision, first.features["train"].vision)
    # a different seq_len is a different entry
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, seq_len=72))
    monkeypatch.undo()
    assert prepare(cfg, progress=False).cache_info["cache_builds"] == 3


class _FakeEncoder:
    def __init__(self, counter: Path):
        with open(counter, "a") as f:
            f.write("built\n")

    def __call__(self, x):
        time.sleep(0.05)
        return {"vision": x.mean(1, keepdim=True).repeat(1, 2, 1), "text": x[:, -1:, :]}


def _builder(root, counter, split):
    cache = FeatureCache(root)
    feats = cache.get_or_build({"s": 1}, split, lambda: _FakeEncoder(counter), batch_size=8, progress=False)
    assert feats.vision.shape == (len(split), 2, split.n_vars)


def test_concurrent_builders_compute_once(data_dir, tmp_path):
    split = load_split("ETTh1", "val", 48, 24, DataConfig(max_windows=40))
    counter = tmp_path / "builds.txt"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_builder, args=(str(tmp_path / "c"), counter, split)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert counter.read_text().count("built") == 1


def test_half_written_entries_are_never_read(data_dir, tmp_path):
    split = load_split("ETTh1", "val", 48, 24, DataConfig(max_windows=16))
    cache = FeatureCache(str(tmp_path))
    key = cache_key({"s": 1}, split)
    # a crashed writer leaves only its temporary file behind: the entry counts as missing and is rebuilt
    (tmp_path / f".{key}.deadbeef.tmp").write_bytes(b"PAR1 truncated")
    assert not cache.exists(key)
    cache.get_or_build({"s": 1}, split, lambda: _FakeEncoder(tmp_path / "n"), progress=False)
    assert cache.stats.builds == 1 and cache.exists(key)


def test_fsspec_filesystems_work(data_dir):
    split = load_split("ETTh1", "val", 48, 24, DataConfig(max_windows=16))
    cache = FeatureCache("memory://timevlm-test-cache")
    a = cache.get_or_build({"s": 2}, split, lambda: _FakeEncoder(Path("/dev/null")), progress=False)
    b = FeatureCache("memory://timevlm-test-cache").get_or_build({"s": 2}, split, lambda: None, progress=False)
    torch.testing.assert_close(a.vision, b.vision)
    torch.testing.assert_close(a.text, b.text)


def test_unwritable_cache_fails_naming_the_path_or_falls_back_to_memory(data_dir, tmp_path):
    import pytest

    from timevlm.errors import CacheError

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")  # unwritable even for root
    bad = blocker / "cache"
    with pytest.raises(CacheError, match=f"feature cache {bad}: cannot create it.*cache_fallback=memory"):
        prepare(_cfg(bad), progress=False)
    cfg = _cfg(bad)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, cache_fallback="memory"))
    with pytest.warns(UserWarning, match="computing features in memory"):
        p = prepare(cfg, progress=False)
    assert p.features["val"] is not None and p.cache_info["cache_builds"] == 3 and not bad.exists()


def test_a_write_that_fails_part_way_leaves_no_entry(data_dir, tmp_path, monkeypatch):
    import pyarrow.parquet as pq
    import pytest

    from timevlm import features
    from timevlm.errors import CacheError

    def half_write(table, f):  # some bytes reach the disk, then the disk is full
        f.write(b"PAR1 half an entry")
        raise OSError(28, "No space left on device")

    real = pq.write_table
    monkeypatch.setattr(features.pq, "write_table", half_write)
    with pytest.raises(CacheError, match="cannot write it .*No space left on device"):
        prepare(_cfg(tmp_path), progress=False)
    cache = FeatureCache(str(tmp_path))
    assert cache.keys() == set() and not [p for p in tmp_path.iterdir() if p.suffix in (".tmp", ".parquet")]
    monkeypatch.setattr(features.pq, "write_table", real)  # the disk has room again
    assert prepare(_cfg(tmp_path), progress=False).cache_info["cache_builds"] == 3
    assert len(cache.keys()) == 3


def test_shuffled_features_pair_each_window_with_another_windows_pair(data_dir, tmp_path):
    own = prepare(_cfg(tmp_path), progress=False)
    cfg = _cfg(tmp_path)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, shuffle_features=True))
    shuffled, again = prepare(cfg, progress=False), prepare(cfg, progress=False)
    for split in ("train", "val", "test"):
        a, b = own.features[split], shuffled.features[split]
        # the same rows, in another order; vision and text moved together, so every image keeps its own prompt
        rows = [int(np.flatnonzero((a.vision.flatten(1) == v).all(1))[0]) for v in b.vision.flatten(1)]
        assert sorted(rows) == list(range(len(a.vision))) and rows != sorted(rows)
        torch.testing.assert_close(b.text, a.text[rows])
        torch.testing.assert_close(again.features[split].vision, b.vision)  # the seed decides the order
    assert shuffled.cache_info["cache_builds"] == 0  # the cache entries are the windows' own, unshuffled
    with pytest.raises(ValueError, match="shuffle_features"):  # the config refuses it before any run
        dataclasses.replace(cfg.train, use_feature_cache=False)
