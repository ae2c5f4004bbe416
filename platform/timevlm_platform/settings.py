"""Where a study's things live when the user does not say: the platform's home, and from it the MLflow store,
the feature cache, Ray's results and Optuna's storage. Resolved once per study (`resolve_paths`) and passed on."""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from timevlm.data.files import resolve_data_dir
from timevlm.features import resolve_cache_root
from timevlm_platform import tracking


def platform_home() -> Path:
    """Where the embedded defaults live (mlruns/, ray_results/, feature_cache/): $TIMEVLM_HOME, else
    ~/timevlm-platform inside a `ray job submit` job (whose working dir is a temporary copy that Ray
    deletes), else the current directory."""
    if os.environ.get("TIMEVLM_HOME"):
        return Path(os.environ["TIMEVLM_HOME"]).expanduser().resolve()
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ:
        return Path.home() / "timevlm-platform"
    return Path.cwd()


def default_optuna_storage(tracking_uri: str, home: Path) -> str:
    """Optuna's studies in an SQLite file beside the embedded MLflow store (or in the platform's home when MLflow
    is a server), so `optuna-dashboard <url>` shows every searched study and --resume continues its sampler."""
    db = tracking.sqlite_path(tracking_uri)
    return f"sqlite:///{(db.parent if db else home) / 'optuna.db'}"


@dataclass(frozen=True)
class StudyPaths:
    data_dir: str
    tracking_uri: str
    cache_dir: str  # a local path (made absolute) or an fsspec URI
    storage: str  # Ray Tune/Train results: a local path (made absolute) or a URI
    optuna_storage: str  # an Optuna RDB URL


def _absolute(path: str) -> str:
    return path if "://" in path else str(Path(path).resolve())


def resolve_paths(data_dir: str | None = None, tracking_uri: str | None = None, cache_dir: str | None = None,
                  storage: str | None = None, optuna_storage: str | None = None) -> StudyPaths:
    """Each path from its option, else its environment variable, else the default under `platform_home()`."""
    home = platform_home()
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_tracking_uri(home)
    return StudyPaths(
        data_dir=str(resolve_data_dir(data_dir).resolve()), tracking_uri=uri,
        cache_dir=_absolute(resolve_cache_root(cache_dir, home)),
        storage=_absolute(storage or os.environ.get("TIMEVLM_STORAGE_PATH") or str(home / "ray_results")),
        optuna_storage=(optuna_storage or os.environ.get("TIMEVLM_OPTUNA_STORAGE")
                        or default_optuna_storage(uri, home)))


def spool_root(storage: str, parent_run_id: str) -> str:
    """Where a study's MLflow calls wait while the server is away: beside its Ray results (shared storage on a
    cluster, so the driver can send what a worker node left), else a local temporary folder."""
    if "://" in storage:
        return str(Path(tempfile.gettempdir()) / "timevlm-tracking-spool" / parent_run_id)
    return str(Path(storage) / "tracking_spool" / parent_run_id)
