"""Split borders, window counts, train-only scaling, few-shot, zero-shot, and errors for bad files."""
from __future__ import annotations

import numpy as np
import pytest

from timevlm.config import DataConfig
from timevlm.data.registry import DATASETS, get_dataset
from timevlm.data.files import read_table
from timevlm.data.splits import build_splits
from timevlm.data.windows import load_split, make_loader, split_borders
from conftest import ett_frame
from timevlm.errors import ConfigError, DataError


def test_registry_holds_the_paper_datasets():
    for name in ("ETTh1", "ETTh2", "ETTm1", "ETTm2", "Weather", "Electricity", "Traffic", "M4-Hourly", "M4-Weekly"):
        spec = get_dataset(name)
        assert spec.n_vars > 0 and spec.periodicity > 0 and spec.description
    assert (get_dataset("ETTh1").periodicity, get_dataset("ETTm1").periodicity, get_dataset("Weather").periodicity) \
        == (24, 96, 144)
    assert get_dataset("M4-Hourly").horizon == 48 and get_dataset("M4-Weekly").horizon == 13
    with pytest.raises(ConfigError, match="unknown dataset 'ETTh3'"):
        get_dataset("ETTh3")


def test_ett_borders_match_the_protocol():
    b1, b2 = split_borders(get_dataset("ETTh1"), 17420, 96)
    assert b2 == [8640, 11520, 14400] and b1 == [0, 8640 - 96, 11520 - 96]
    b1, b2 = split_borders(get_dataset("ETTm1"), 69680, 512)
    assert b2 == [34560, 46080, 57600] and b1 == [0, 34560 - 512, 46080 - 512]


@pytest.mark.parametrize("name,seq_len,pred_len,counts", [
    ("ETTh1", 96, 96, (8449, 2785, 2785)),
    ("ETTh1", 512, 96, (8033, 2785, 2785)),
    ("ETTm1", 96, 96, (34369, 11425, 11425)),
    ("ETTh1", 96, 720, (7825, 2161, 2161)),
])
def test_window_counts(data_dir, name, seq_len, pred_len, counts):
    splits = build_splits(DataConfig(dataset=name), seq_len, pred_len)
    assert tuple(len(splits[s]) for s in ("train", "val", "test")) == counts


def test_scaler_is_fitted_on_train_only_and_windows_line_up(data_dir):
    raw = read_table(get_dataset("ETTh1"))
    splits = build_splits(DataConfig(dataset="ETTh1"), 96, 24)
    train = splits["train"]
    np.testing.assert_allclose(train.scaler.mean, raw[:8640].mean(0), rtol=1e-5)
    assert abs(train.values.mean()) < 1e-4  # train split standardised...
    mean, std = raw[:8640].mean(0), raw[:8640].std(0)  # ...and test scaled with train statistics
    np.testing.assert_allclose(splits["test"].values, (raw[11520 - 96:14400] - mean) / std, rtol=1e-4, atol=1e-4)
    assert np.abs(splits["test"].values.mean(0) - 0).max() > 0.1  # (a re-fit on test would centre it)
    # the first test window starts seq_len before the test border; its target starts at the border
    x, y = splits["test"].window(0)
    np.testing.assert_allclose(y[0], train.scaler.transform(raw[11520:11521])[0], rtol=1e-5)
    np.testing.assert_allclose(x[-1], train.scaler.transform(raw[11519:11520])[0], rtol=1e-5)


def test_few_shot_first_cut_takes_the_first_windows(data_dir):
    full = load_split("ETTh1", "train", 96, 96, DataConfig())
    few = load_split("ETTh1", "train", 96, 96, DataConfig(percent=10, few_shot="first"))
    assert len(few) == (8640 - 96) * 10 // 100 + 96 - 96 - 96 + 1 == 759
    np.testing.assert_array_equal(few.window(0)[0], full.window(0)[0])
    np.testing.assert_array_equal(few.window(758)[1], full.window(758)[1])


def test_few_shot_random_cut_draws_from_all_windows_with_the_seed(data_dir):
    """The official Time-VLM cut: int(n * percent / 100) of all training windows, drawn with the run's seed;
    the scaler is still fit on the whole training split, and val/test are the full-data ones."""
    full = build_splits(DataConfig(dataset="ETTh1"), 512, 720)
    cfg = DataConfig(dataset="ETTh1", percent=10)
    a, b = build_splits(cfg, 512, 720, seed=2021), build_splits(cfg, 512, 720, seed=2021)
    other = build_splits(cfg, 512, 720, seed=2022)["train"]
    assert len(full["train"]) == 7409 and len(a["train"]) == 740 == len(other)  # official: 740 (first cut: 93)
    np.testing.assert_array_equal(a["train"].starts, b["train"].starts)  # the seed decides the draw...
    assert len(np.setdiff1d(a["train"].starts, other.starts)) > 600
    assert set(a["train"].starts) <= set(full["train"].starts) and np.all(np.diff(a["train"].starts) > 0)
    assert a["train"].starts.max() > 0.9 * full["train"].starts.max()  # ...from the whole split, not its start
    np.testing.assert_array_equal(a["train"].values, full["train"].values)  # same rows, same scaler
    np.testing.assert_array_equal(a["train"].scaler.mean, full["train"].scaler.mean)
    for s in ("val", "test"):
        np.testing.assert_array_equal(a[s].starts, full[s].starts)
        np.testing.assert_array_equal(a[s].values, full[s].values)
    x, y = a["train"].window(5)
    s0 = int(a["train"].starts[5])
    np.testing.assert_array_equal(y, full["train"].values[s0 + 512:s0 + 512 + 720])


def test_few_shot_random_cut_holds_where_the_first_cut_has_no_window(data_dir):
    """ETTh1 5% at 512 -> 720: the first 5% of the rows hold no window; the random cut keeps 370 of 7409."""
    with pytest.raises(DataError, match="too short"):
        load_split("ETTh1", "train", 512, 720, DataConfig(percent=5, few_shot="first"))
    assert len(load_split("ETTh1", "train", 512, 720, DataConfig(percent=5), seed=7)) == 370
    with pytest.raises(DataError, match="seed"):
        load_split("ETTh1", "train", 512, 720, DataConfig(percent=5))
    with pytest.raises(ConfigError, match="few_shot must be random or first, got 'last'"):
        DataConfig(percent=5, few_shot="last")


def test_zero_shot_tests_on_the_target(data_dir):
    splits = build_splits(DataConfig(dataset="ETTh1", test_dataset="ETTh2"), 96, 96)
    assert splits["train"].dataset == "ETTh1" and splits["test"].dataset == "ETTh2"


def test_test_loader_keeps_the_last_partial_batch(data_dir):
    test = load_split("ETTh1", "test", 96, 96, DataConfig())
    assert sum(len(b[0]) for b in make_loader(test, 64, shuffle=False)) == 2785


def _write(tmp_path, df, name="ETTh1.csv"):
    df.to_csv(tmp_path / name, index=False)
    return DataConfig(dataset="ETTh1", data_dir=str(tmp_path))


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"ETTh1\.csv: data file for ETTh1 not found"):
        build_splits(DataConfig(dataset="ETTh1", data_dir=str(tmp_path)), 96, 96)


def test_wrong_columns_are_named(tmp_path):
    cfg = _write(tmp_path, ett_frame().rename(columns={"OT": "oil"}))
    with pytest.raises(DataError, match=r"ETTh1\.csv: missing column\(s\) \['OT'\]"):
        build_splits(cfg, 96, 96)


def test_nan_values_are_located(tmp_path):
    df = ett_frame()
    df.loc[100, "HULL"] = np.nan
    cfg = _write(tmp_path, df)
    with pytest.raises(DataError, match=r"1 NaN/inf value\(s\), first at data row 101 column 'HULL'"):
        build_splits(cfg, 96, 96)


def test_too_short_series(tmp_path):
    cfg = _write(tmp_path, ett_frame(rows=9000))
    with pytest.raises(DataError, match=r"9000 rows, but the ETTh1 protocol needs 14400 rows"):
        build_splits(cfg, 96, 96)
    with pytest.raises(DataError, match=r"too short for seq_len 96 \+ pred_len 3000"):
        build_splits(DataConfig(dataset="ETTh1"), 96, 3000)


def test_registry_knows_every_shared_file(data_dir):
    for spec in (s for n in DATASETS.names() if (s := get_dataset(n)).md5):
        if (data_dir / spec.file).exists():
            from timevlm.data.files import md5sum
            assert md5sum(data_dir / spec.file) == spec.md5, spec.file
