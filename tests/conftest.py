from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from timevlm.data.files import resolve_data_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    d = resolve_data_dir()
    assert (d / "ETTh1.csv").is_file(), f"benchmark data not found in {d}; set TIMEVLM_DATA_DIR"
    return d


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> str:
    """One feature cache for the whole test session (tests that check cache behaviour make their own)."""
    return os.environ.get("TIMEVLM_TEST_CACHE") or str(tmp_path_factory.mktemp("feature_cache"))


def ett_frame(rows: int = 17420) -> pd.DataFrame:
    """A synthetic ETTh1-shaped table (date + the seven ETT columns), for writing bad files in tests."""
    cols = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    df = pd.DataFrame(np.random.default_rng(0).normal(size=(rows, 7)), columns=cols)
    df.insert(0, "date", pd.date_range("2016-07-01", periods=rows, freq="h").astype(str))
    return df


@pytest.fixture(scope="session")
def postgres_or_none():
    """One real PostgreSQL server for the session (tests/postgres_server.py; each test makes its own databases),
    or None where PostgreSQL or its driver is not installed (its tests then skip or use SQLite, saying so)."""
    import postgres_server

    if postgres_server.missing():
        yield None
        return
    pg = postgres_server.Postgres().start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def postgres(postgres_or_none):
    """The session's PostgreSQL server; skips, saying why, only where it cannot be installed."""
    import postgres_server

    if postgres_or_none is None:
        pytest.skip(postgres_server.missing())
    return postgres_or_none
