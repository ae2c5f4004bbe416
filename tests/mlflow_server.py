"""A real `mlflow server` process on a test's store (the UI test, the tracking-outage test)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, log: Path, timeout_s: float = 90, port: int | None = None,
                  artifacts: Path | None = None):
    """`mlflow server` on the store, on a free local port (or `port`); yields its base URL, stops it after."""
    port = port or free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    with open(log, "a") as out:
        proc = subprocess.Popen([str(mlflow_bin), "server", "--backend-store-uri", backend_uri, "--host",
                                 "127.0.0.1", "--port", str(port), "--workers", "1",
                                 *(["--artifacts-destination", str(artifacts)] if artifacts else [])],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not come up on {base}: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
