"""`ray job submit --working-dir . -- python tune.py --smoke` against a real local Ray head (own module: `ray stop`
ends every Ray process on the machine, so no other Ray instance may be alive while it runs)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _ray(*args, env):
    return subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_ray_job_submit_smoke(tmp_path, data_dir, shared_cache):
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    port, dash = "6391", "8271"
    r = _ray("start", "--head", f"--port={port}", f"--dashboard-port={dash}", "--num-cpus=2",
             "--disable-usage-stats", env=env)
    assert r.returncode == 0, r.stderr
    try:
        runtime_env = ('{"env_vars": {"TIMEVLM_DATA_DIR": "%s", "TIMEVLM_HOME": "%s", "TIMEVLM_CACHE_DIR": "%s"}}'
                       % (data_dir, tmp_path / "home", shared_cache))
        t0 = time.time()
        r = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit",
                            "--address", f"http://127.0.0.1:{dash}", "--working-dir", ".",
                            "--runtime-env-json", runtime_env, "--", "python", "tune.py", "--smoke"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        print(f"job submission wall time {time.time() - t0:.0f}s")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "succeeded" in r.stdout + r.stderr
        job_id = re.search(r"raysubmit_[A-Za-z0-9]+", r.stdout + r.stderr).group(0)
        st = _ray("job", "status", "--address", f"http://127.0.0.1:{dash}", job_id, env=env)
        assert re.search(rf"{job_id}\S* succeeded", re.sub(r"\x1b\[[0-9;]*m", "", st.stdout + st.stderr))
        assert (tmp_path / "home" / "mlruns" / "mlflow.db").exists()  # results outlive the job's temp dir
    finally:
        _ray("stop", "--force", env=env)
