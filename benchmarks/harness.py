"""What the speed benchmarks share: measuring the library as it is now and as it was at a git commit in the same
run (each measurement a fresh interpreter whose `timevlm` comes from the working tree or from a worktree of that
commit), and writing their rows as CSV."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

HERE = Path(__file__).resolve().parent


@contextmanager
def libraries(refs: Sequence[str]) -> Iterator[dict[str, str | None]]:
    """{"now": None} and, per git ref in `refs`, {ref: path of a temporary worktree at ref} (removed afterwards).
    A ref that is a directory holding a `timevlm` package is used as it is (a copy of an older library carried
    to a machine without the repository's history, such as a lent GPU machine)."""
    libs: dict[str, str | None] = {"now": None}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for ref in refs:
                if (Path(ref) / "timevlm" / "__init__.py").is_file():
                    libs[ref] = str(Path(ref).resolve())
                    continue
                path = f"{tmp}/at-{ref}"
                subprocess.run(["git", "worktree", "add", "--detach", path, ref], cwd=HERE, check=True,
                               capture_output=True)
                libs[ref] = path
            yield libs
        finally:
            for ref, path in libs.items():
                if path and path.startswith(tmp):
                    subprocess.run(["git", "worktree", "remove", "--force", path], cwd=HERE, capture_output=True)


def run_child(module: str, func: str, spec: dict, library: str | None) -> dict:
    """`benchmarks/<module>.py`'s `func(spec)` in a fresh interpreter, `timevlm` imported from `library`."""
    env = dict(os.environ)
    if library:  # ahead of the installed (editable) package
        env["PYTHONPATH"] = os.pathsep.join([library, env.get("PYTHONPATH", "")])
    code = (f"import json, sys; sys.path.insert(0, {str(HERE)!r}); import {module}; "
            f"print('RESULT' + json.dumps({module}.{func}(json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{module}.{func} failed for {spec}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT"):])


def write_rows(path: str | Path, rows: list[dict]) -> None:
    """Rows as CSV (the union of their keys as columns, in order of first appearance); says where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path}")
