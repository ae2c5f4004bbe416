"""A real `mlflow server` process on a test's store (the UI test, the tracking-outage test)."""
from __future__ import annotations

import contextlib
import os
import signal
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
def serve(cmd: list[str], base: str, log: Path, env: dict | None = None, timeout_s: float = 90):
    """Start a tracking server command, wait until `base`/health answers, yield; stop its process group after (a
    server still finishing requests on a loaded machine after 30 s is killed: stopping it is not the test)."""
    with open(log, "a") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
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
                raise RuntimeError(f"the tracking server did not come up on {base}: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have died already (the error above says why)
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_server(backend_uri: str, log: Path, timeout_s: float = 90, port: int | None = None,
                  artifacts: Path | None = None):
    """`mlflow server` on the store, on a free local port (or `port`); yields its base URL, stops it after."""
    port = port or free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin), "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", *(["--artifacts-destination", str(artifacts)] if artifacts else [])]
    with serve(cmd, f"http://127.0.0.1:{port}", log, timeout_s=timeout_s) as base:
        yield base
