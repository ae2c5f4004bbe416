"""Durable MLflow logging: what cannot be sent now is kept, in order, in a per-run journal on disk and sent
when the tracking server answers again (before the run's next call, at the end of the trial, at the latest
at the end of the study). Nothing a trial logs is dropped because the server was away for a while.

A journal is `<root>/<run_id>.jsonl` (one call per line) with the files it refers to in `<root>/<run_id>/`.
`root` is the study's storage (shared on a cluster, so the driver can send what a worker node left behind),
or a local folder. Replaying a call twice is harmless: metric points are keyed by (key, step, timestamp,
value), params and tags are set to the same value, artifacts are overwritten.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from timevlm_platform import tracking
from timevlm_platform.mlflow_ops import FILE_ARGS, OPS


# Answers that say the server is up and refuses the call itself: sending it again cannot succeed, so it is
# reported and skipped (never kept, where it would hold back every call after it), unlike an outage
REJECTIONS = ("INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
              "INVALID_STATE", "PERMISSION_DENIED")


def rejected(e: Exception) -> bool:
    """Whether the server refused the call itself. A unique-constraint error is not that: two trials created the
    same row at once (the same dataset logged as an input by both), and the call succeeds when sent again."""
    if not (isinstance(e, MlflowException) and e.error_code in REJECTIONS):
        return False
    return not any(race in str(e) for race in ("IntegrityError", "UNIQUE constraint failed", "Duplicate entry"))


def _report_rejection(run_id: str, op: str, e: Exception) -> None:
    tracking.LogFailures.count += 1
    print(f"[timevlm-platform] WARNING: MLflow refused run {run_id[:8]}'s {op} call, which is skipped: "
          f"{str(e).splitlines()[0][:300]}", file=sys.stderr, flush=True)


def _run_op(client: MlflowClient, run_id: str, name: str, kw: dict[str, Any]) -> Any:
    return OPS[name](client, run_id, **kw)


class DurableRun:
    """One MLflow run's logging calls: sent at once while the server answers, journaled while it does not."""

    def __init__(self, client: MlflowClient, run_id: str, root: str | Path | None, retries: int = 3,
                 count_delays: bool = True) -> None:
        # MLflow's HTTP client retries a refused request 7 times with exponential backoff (minutes per call)
        # before it fails; here a failed call is kept, not lost, so fail fast and journal
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.client, self.run_id, self.retries = client, run_id, retries
        # a trial's run shows how many of its calls came late; the study's run shows the study's total instead
        self.count_delays = count_delays
        self.root = Path(root) if root else Path(tempfile.gettempdir()) / "timevlm-tracking-spool"
        self.journal = self.root / f"{run_id}.jsonl"
        self.files = self.root / run_id
        self.counter = self.root / f"{run_id}.delayed"

    # -- the calls -------------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        points = [[k, v, now, step] for k, v in tracking.numeric(metrics).items()]
        if points:
            self.call("metrics", points=points)

    def log_params(self, params: dict[str, Any]) -> None:
        self.call("params", params={k: str(v) for k, v in params.items()})  # tracking.log_params truncates

    def set_tags(self, tags: dict[str, Any]) -> None:
        self.call("tags", tags={k: str(v) for k, v in tags.items()})  # tracking.set_tags truncates

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.call("artifact", path=str(path), artifact_path=artifact_path)

    def log_inputs(self, datasets: list[dict]) -> None:
        self.call("inputs", datasets=datasets)

    def log_model(self, path: str | Path, name: str = "model", params: dict[str, Any] | None = None,
                  metrics: dict[str, float] | None = None) -> str | None:
        return self.call("model", path=str(path), name=name,
                         params={k: str(v)[:6000] for k, v in (params or {}).items()},
                         metrics=tracking.numeric(metrics or {}))

    def terminate(self, ok: bool) -> None:
        status = RunStatus.to_string(RunStatus.FINISHED if ok else RunStatus.FAILED)
        self.call("terminate", status=status, end_time=int(time.time() * 1000))

    # -- sending and journaling ------------------------------------------------------------------------
    def pending(self) -> bool:
        return self.journal.exists()

    def call(self, op: str, **kw: Any) -> Any:
        """Send now if nothing is waiting before it and the server answers (returns the call's result); else
        append to the journal (returns None)."""
        if not self.flush():
            self._append(op, kw)
            return None
        try:
            return tracking.backoff(lambda: _run_op(self.client, self.run_id, op, kw), tries=self.retries,
                                    give_up=rejected)
        except Exception as e:  # noqa: BLE001 - the server or network is away: keep the call
            if rejected(e):
                _report_rejection(self.run_id, op, e)
                return None
            self._append(op, kw)
            print(f"[timevlm-platform] MLflow is not answering ({type(e).__name__}); run {self.run_id[:8]}'s "
                  f"calls are kept in {self.journal} and sent when it is back", file=sys.stderr, flush=True)
            return None

    def _append(self, op: str, kw: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if op in FILE_ARGS:  # the file may be a temporary one: keep a copy with the journal
            src = Path(kw[FILE_ARGS[op]])
            dest = self.files / uuid.uuid4().hex[:8] / src.name  # the artifact keeps its name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dest) if src.is_dir() else shutil.copy2(src, dest)
            kw = {**kw, FILE_ARGS[op]: str(dest)}
        with open(self.journal, "a") as f:
            f.write(json.dumps({"op": op, "kw": kw}) + "\n")
        n = int(self.counter.read_text()) if self.counter.exists() else 0
        self.counter.write_text(str(n + 1))

    def flush(self) -> bool:
        """Send the journal's calls in order; True when none is left. Stops at the first that fails."""
        if not self.journal.exists():
            return True
        lines = self.journal.read_text().splitlines()
        for i, line in enumerate(lines):
            entry = json.loads(line)
            try:
                _run_op(self.client, self.run_id, entry["op"], entry["kw"])
            except Exception as e:  # noqa: BLE001 - still away: keep the rest, in order
                if rejected(e):
                    _report_rejection(self.run_id, entry["op"], e)
                    continue
                tmp = self.journal.with_suffix(".tmp")
                tmp.write_text("".join(rest + "\n" for rest in lines[i:]))
                tmp.replace(self.journal)
                return False
        delayed = int(self.counter.read_text()) if self.counter.exists() else 0
        self.journal.unlink()
        shutil.rmtree(self.files, ignore_errors=True)
        if not self.count_delays:
            return True
        try:  # the run says how many of its calls came late (visible in its metrics)
            OPS["metrics"](self.client, self.run_id, [[tracking.SYSTEM_PREFIX + "tracking_calls_delayed", float(delayed), int(time.time() * 1000), 0]])
        except Exception:  # noqa: BLE001
            pass
        return True

    def flush_until(self, timeout_s: float, every_s: float = 2.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while not self.flush():
            if time.monotonic() > deadline:
                return False
            time.sleep(every_s)
        return True


def delayed_counts(root: str | Path) -> tuple[int, int]:
    """(calls delayed, calls still waiting) over every run journaled under `root`."""
    root = Path(root)
    if not root.is_dir():
        return 0, 0
    delayed = sum(int(p.read_text() or 0) for p in root.glob("*.delayed"))
    waiting = sum(len(p.read_text().splitlines()) for p in root.glob("*.jsonl"))
    return delayed, waiting


def flush_all(client: MlflowClient, root: str | Path, timeout_s: float, last: str | None = None) -> list[str]:
    """Send every journal under `root` (the study's end), the run `last` after the others (the study's own
    calls read what its trials logged); returns the run ids still waiting after timeout_s."""
    root = Path(root)
    runs = sorted((p.stem for p in root.glob("*.jsonl")), key=lambda r: r == last) if root.is_dir() else []
    deadline = time.monotonic() + timeout_s
    left = []
    for run_id in runs:
        run = DurableRun(client, run_id, root, count_delays=run_id != last)
        if not run.flush_until(max(0.0, deadline - time.monotonic())):
            left.append(run_id)
    return left
