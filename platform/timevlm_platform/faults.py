"""Fault injection for chaos tests (tests/test_faults.py). Inactive unless $TIMEVLM_FAULTS is set.

$TIMEVLM_FAULTS is JSON, e.g. {"nan_after_epoch": 1, "when": {"model.norm_const": 0.7}}: after that epoch the
weights of the matching trial become NaN, so its next training step has a non-finite loss (the real
divergence path, not a simulated one).
"""
from __future__ import annotations

import json
import os
from typing import Any

ENV = "TIMEVLM_FAULTS"


def _spec() -> dict[str, Any]:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else {}


def nan_after_epoch(flat_config: dict[str, Any]) -> int | None:
    """{"nan_after_epoch": N, "when": {param: value}}: the matching trial's weights turn NaN at the end of epoch N
    (and of any later epoch, after a restart from an earlier checkpoint), so its next loss is not finite."""
    spec = _spec()
    if "nan_after_epoch" not in spec:
        return None
    when = spec.get("when", {})
    if all(str(flat_config.get(k)) == str(v) for k, v in when.items()):
        return int(spec["nan_after_epoch"])
    return None


def slow_epoch() -> None:
    """{"epoch_sleep_s": S}: every epoch ends S seconds later (tests time an MLflow outage into a trial)."""
    seconds = float(_spec().get("epoch_sleep_s", 0))
    if seconds:
        import time

        time.sleep(seconds)


def pause(point: str, timeout_s: float = 300.0) -> None:
    """{"pause_at": {"study_end": DIR}}: at that point of the study, write DIR/paused and wait (at most
    timeout_s) until DIR/resume exists, so a test can act there (stop the tracking server)."""
    folder = _spec().get("pause_at", {}).get(point)
    if not folder:
        return
    import time
    from pathlib import Path

    (Path(folder) / "paused").touch()
    deadline = time.monotonic() + timeout_s
    while not (Path(folder) / "resume").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
