"""Compiles the package's C++ kernels once per machine and loads them with ctypes.

The sources are plain C++ with a C interface (no PyTorch headers, so a build takes about a second, not the
minute a `torch.utils.cpp_extension` build takes). Each is compiled with the system's C++ compiler for the
CPU it runs on (`-march=native`, OpenMP) into a cache folder keyed by the source, the flags, the compiler and
the CPU's feature flags, so a cache shared by unlike nodes never hands one a binary it cannot run. Builders
racing on one key each write their own file and rename it into place. The OpenMP runtime the library asks
for is the one PyTorch has already loaded (same soname), so the kernels and PyTorch share one thread pool.

$TIMEVLM_CPU_KERNELS=0 turns the kernels off (PyTorch's own paths run instead, and the training step leaves
glibc's allocator settings alone, see memory.py); $TIMEVLM_KERNEL_CACHE moves the
cache (default ~/.cache/timevlm/kernels); $TIMEVLM_KERNEL_FLAGS adds compiler flags (the tests build once more
with `-mno-avx512f`, so the branches for CPUs without AVX-512 are compiled and checked on machines with it). A machine without a compiler, or a failed build, falls back to
PyTorch and says why once per process: a log record at INFO level (a speed matter, not worth a console line
in every Ray worker), or a RuntimeWarning where $TIMEVLM_CPU_KERNELS=1 asked for the kernels explicitly.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")
# per library: the attention's softmax needs -ffast-math for glibc's vectorised expf
EXTRA_FLAGS = {"attention": ("-ffast-math",)}
ENABLE_ENV, CACHE_ENV, FLAGS_ENV = "TIMEVLM_CPU_KERNELS", "TIMEVLM_KERNEL_CACHE", "TIMEVLM_KERNEL_FLAGS"
_HERE = Path(__file__).resolve().parent
_log = logging.getLogger(__name__)


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform

    return platform.machine() + platform.processor()


def _cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "timevlm" / "kernels")


def compile_library(name: str) -> Path:
    """Path of `name`.cpp built for this machine, compiling it if the cache has no build yet."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX or install g++)")
    source = _HERE / f"{name}.cpp"
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    flags = (*FLAGS, *EXTRA_FLAGS.get(name, ()), *os.environ.get(FLAGS_ENV, "").split())
    key = hashlib.sha256("\0".join([source.read_text(), " ".join(flags), version, _cpu_flags()]).encode())
    target = _cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cxx, *flags, str(source), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{cxx} could not build {source.name}:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(name: str, signatures: dict[str, list] | None = None) -> ctypes.CDLL | None:
    """The compiled library with its functions' argument types set from `signatures` (all return void), or None
    (kernels off, or no build possible: said once)."""
    lib = _load(name)
    if lib is not None and signatures and not getattr(lib, "_typed", False):
        for function, argtypes in signatures.items():
            getattr(lib, function).argtypes, getattr(lib, function).restype = argtypes, None
        lib._typed = True
    return lib


def forget() -> None:
    """Drop the loaded libraries, so the next load reads $TIMEVLM_CPU_KERNELS and the cache again (tests)."""
    _load.cache_clear()


@functools.cache
def _load(name: str) -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        return ctypes.CDLL(str(compile_library(name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        message = f"timevlm: the C++ kernel {name!r} is unavailable, PyTorch's own path runs instead: {err}"
        if os.environ.get(ENABLE_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        else:
            _log.info(message)
        return None
