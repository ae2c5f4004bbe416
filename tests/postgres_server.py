"""A real PostgreSQL server for the test session (Debian's `postgresql` package, which `.ci/run` installs), and
the tracking server the cluster docs recommend on it: `cluster/mlflow/start_local_server.sh` itself, so the
documented path is the tested one.

PostgreSQL refuses to run as root: as root the data folder is given to the `postgres` user and its commands run
as that user (`runuser`); as anyone else they run directly. It listens on 127.0.0.1 on a free port, with its
socket in its own folder, so it never meets a system cluster on 5432."""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from mlflow_server import free_port, serve

REPO = Path(__file__).resolve().parents[1]


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin folder, or None when it is not installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def missing() -> str | None:
    """Why a PostgreSQL test cannot run here, or None."""
    if postgres_bin() is None:
        return "PostgreSQL is not installed (apt-get install postgresql; .ci/run does it as root)"
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "the PostgreSQL driver is not installed (pip install -e '.[cluster]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without `runuser` to start PostgreSQL as its own user"
    return None


class Postgres:
    """A server in its own folder under the system's temp dir (pytest's folders are private to their user, so
    the `postgres` user could not reach one there); removed when stopped."""

    def __init__(self) -> None:
        self.bin, self.port = postgres_bin(), free_port()
        self.root = Path(tempfile.mkdtemp(prefix="timevlm-postgres-"))
        self.data, self.sock = self.root / "data", self.root / "sock"

    def _run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*as_user, *cmd], check=check, capture_output=True, text=True)

    def start(self) -> "Postgres":
        self.sock.mkdir(exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sock, "postgres")
            os.chmod(self.root, 0o755)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o",
                  f"-p {self.port} -k {self.sock} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")
        return self

    def create_database(self, name: str) -> str:
        """A new database; returns its SQLAlchemy URL."""
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name)
        return self.url(name)

    def url(self, name: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def tracking_server(db_url: str, artifacts: Path, log: Path, port: int | None = None, timeout_s: float = 180):
    """`cluster/mlflow/start_local_server.sh` on `db_url` with served artifacts in a local folder: yields its base
    URL (workers need only that), stops it after."""
    port = port or free_port()
    env = {**os.environ, "MLFLOW_DB_URI": db_url, "MLFLOW_ARTIFACTS": str(artifacts), "PORT": str(port),
           "WORKERS": "1", "HOST": "127.0.0.1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with serve(["bash", str(REPO / "cluster" / "mlflow" / "start_local_server.sh")], f"http://127.0.0.1:{port}",
               log, env=env, timeout_s=timeout_s) as base:
        yield base


_databases = iter(range(1_000_000))


@contextlib.contextmanager
def tracking_store(pg: Postgres | None, tmp_path: Path, port: int | None = None, artifacts: Path | None = None,
                   log: Path | None = None, backend: str | None = None):
    """A tracking server for a test: the production stack (PostgreSQL, the cluster script, served artifacts) where
    PostgreSQL is installed, else `mlflow server` on SQLite. `backend`: reuse a database made by an earlier call
    (a server stopped and started again); yields (base URL, backend)."""
    from mlflow_server import mlflow_server

    artifacts, log = artifacts or tmp_path / "art", log or tmp_path / "server.log"
    if pg is None:
        backend = backend or f"sqlite:///{tmp_path / 'mlflow.db'}"
        with mlflow_server(backend, log, port=port, artifacts=artifacts) as base:
            yield base, backend
        return
    backend = backend or pg.create_database(f"mlflow_{next(_databases)}_{os.getpid()}")
    with tracking_server(backend, artifacts, log, port=port) as base:
        yield base, backend
