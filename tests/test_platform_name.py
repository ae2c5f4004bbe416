"""DESIGN.md section 1: the repository's `platform/` folder must never shadow the standard library's
`platform` module, from the repo root, under pytest, for tune.py, and in Ray workers (see test_study_e2e)."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO


def test_stdlib_platform_from_the_repo_root():
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.system(), platform.__file__)"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    system, path = out.split()
    assert system == "Linux" or system
    assert Path(path).parent == Path(sysconfig.get_paths()["stdlib"])


def test_stdlib_platform_under_pytest():
    import platform

    assert callable(platform.system) and platform.system()
    assert not (REPO / "platform" / "__init__.py").exists()
    import timevlm_platform

    assert Path(timevlm_platform.__file__).parent == REPO / "platform" / "timevlm_platform"


def test_tune_py_help_from_the_repo_root():
    r = subprocess.run([sys.executable, "tune.py", "--help"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0, r.stderr
    assert "--study" in r.stdout and "--resume" in r.stdout


def test_torch_and_ray_import_from_the_repo_root_with_repo_on_path():
    code = "import torch, ray, platform; print(platform.system())"
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
