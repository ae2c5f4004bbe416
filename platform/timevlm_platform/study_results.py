"""A study's outcome in MLflow: the trials table, each cell's best trial (marked, its model registered), the
study run's summary metrics, and the closing of runs that Tune's scheduler stopped."""
from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from ray import tune

from timevlm.overrides import short_name
from timevlm_platform import model_logging, selection, spool, tracking
from timevlm_platform.console import PREFIX
from timevlm_platform.spool import DurableRun
from timevlm_platform.study import CELL_KEY, Cell, StudySpec


def trials_table(results: tune.ResultGrid, spec: StudySpec, cells: dict[str, Cell]) -> pd.DataFrame:
    zero_shot = any(c.test_dataset for c in cells.values())
    rows = []
    for r in results:
        m = r.metrics or {}
        cell = cells[r.config[CELL_KEY]] if CELL_KEY in (r.config or {}) else next(iter(cells.values()))
        status = "ERROR" if r.error else ("DONE" if "test_mse" in m else "STOPPED")
        row = {"dataset": cell.dataset, **({"test_dataset": cell.test_dataset} if zero_shot else {}),
               "horizon": cell.horizon,
               "trial": m.get("trial_id", r.path.rsplit("_", 2)[-2] if r.path else "?"), "status": status}
        row.update({short_name(key): r.config.get(key) for key in spec.searched_keys})
        if spec.seeds > 1:
            row["seed"] = r.config.get("train.seed")
        row.update({"epochs": m.get("epoch"), spec.metric: m.get(spec.metric),
                    "test_mse": m.get("test_mse"), "test_mae": m.get("test_mae")})
        if r.error:
            row["error"] = str(r.error).strip().splitlines()[-1][:80]
        row["seconds"] = m.get("time_total_s", 0.0)
        rows.append(row)
    return pd.DataFrame(rows)


def utilisation(trial_seconds: float, slots: int, wall: float) -> float:
    """Share of the cluster's trial slots kept busy while the study's trials ran: slot-seconds the trials held
    over slots x the wall time of the trial phase (the up-front feature build and setup are reported beside)."""
    return trial_seconds / (slots * wall) if slots and wall > 0 else float("nan")


def trial_busy_seconds(client: MlflowClient, experiment_id: str, parent_id: str, since: float,
                       table: pd.DataFrame, until: float | None = None) -> float:
    """How long trials held their slots in this invocation: each trial run's start to end in MLflow (the driver
    opens it first and closes it last, so Train's worker start and shutdown count; Tune's time_total_s stops
    at the last report), cut to the trial phase [`since`, `until`]: runs finished before `since` (an earlier,
    resumed invocation) are not counted, and a run closed after `until` (a stopped trial the study closes at its
    end) counts only up to it, so the slots can never read busier than the wall time allows. With the server
    away, Tune's own times (the table's `seconds`)."""
    try:
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
                                  max_results=10000)
    except Exception:  # noqa: BLE001 - a figure about the study, not a result: the lower bound will do
        return float(table["seconds"].sum()) if "seconds" in table else 0.0
    end = (until or float("inf")) * 1000
    return sum(max(0.0, min(r.info.end_time, end) - max(r.info.start_time, since * 1000)) / 1000 for r in runs
               if r.info.end_time and r.info.end_time >= since * 1000)


def close_stopped(study: DurableRun, experiment_id: str, stopped: set[str], scheduler: str = "ASHA") -> None:
    """Tune's verdict decides how a stopped trial's MLflow run ends (a journaled call of the study's run)."""
    if stopped:
        study.call("close_stopped", experiment_id=experiment_id, stopped=sorted(stopped), scheduler=scheduler)


def fail_trial(run: DurableRun, reason: str) -> None:
    """End a trial's run FAILED with its reason (a journaled call of the trial's run, see `mlflow_ops.end_failed_trial`)."""
    run.call("fail_trial", reason=reason, end_time=int(time.time() * 1000))


def _metric_values(best, keys) -> dict[str, float]:
    return {k: float(best[k]) for k in keys
            if best.get(k) is not None and not (isinstance(best[k], float) and math.isnan(best[k]))}


def _tag_best(study: DurableRun, tracking_uri, experiment_id, spec, cell, best, many_cells: bool) -> str | None:
    """Mark a cell's best trial (by validation), register its model, and note it on the study's run; returns the
    registered model's name (also when the server is away and the call waits in the journal), None when the
    trial has no model to register."""
    prefix = f"best.{cell.label.replace('-', '.')}"
    tags = {f"{prefix}.trial": best["trial"], f"{prefix}.{spec.metric}": best[spec.metric]}
    tags.update({f"{prefix}.{key}": best[short_name(key)] for key in spec.searched_keys})
    metrics = _metric_values(best, (spec.metric, "test_mse", "test_mae"))
    name = model_logging.registered_name(spec.name, cell.label)
    register = {"name": name, "description": f"Best trial of study {spec.name} on {cell.label}, chosen on "
                                              f"validation {spec.metric}.",
                "tags": {k: str(v) for k, v in {**metrics, "trial": best["trial"], "study": spec.name,
                                                "cell": cell.label,
                                                **{k: best[short_name(k)] for k in spec.searched_keys}}.items()}}
    done = study.call("mark_best", experiment_id=experiment_id, trial=str(best["trial"]), prefix=prefix,
                      tags={k: str(v) for k, v in tags.items()}, register=register, tracking_uri=tracking_uri)
    if many_cells:  # the cell's own figures, grouped under its label in MLflow's charts
        study.log_metrics({f"{cell.label}/{k}": v for k, v in metrics.items()})
    return name if done or study.pending() else None


def log_study_metrics(study: DurableRun, spec, bests: dict) -> None:
    """The study's result on its run: the best trials' values, averaged over cells when there are several (the
    paper's "average over horizons" rows), as `study/<metric>`: under the trials' own names the study's row
    would tie with its best trial when the runs are sorted or charted by them."""
    per_cell = [_metric_values(b, (spec.metric, "test_mse", "test_mae")) for b in bests.values()]
    keys = set().union(*per_cell) if per_cell else set()
    study.log_metrics({f"study/{k}": float(np.mean([m[k] for m in per_cell if k in m])) for k in keys})


def log_selection_gap(study: DurableRun, spec: StudySpec, table: pd.DataFrame) -> pd.DataFrame:
    """The selection gap of the study's trials (timevlm_platform.selection: a diagnostic beside the validation
    choice, which alone decides `@best`): printed, and on the study's run as `diagnostic/*` metrics and a CSV."""
    keys = [short_name(k) for k in spec.searched_keys]
    gap = selection.selection_gap(table, keys, val=spec.metric) if len(table) else pd.DataFrame()
    if gap.empty or gap["configs"].max() < 2:  # one configuration per cell: nothing to choose between
        return gap
    print(f"{PREFIX} {selection.summary_line(gap)}", flush=True)
    study.log_metrics({"diagnostic/test_selected_test_mse": float(gap["test_selected_test_mse"].mean()),
                       "diagnostic/selection_gap_pct": float(gap["selection_gap_pct"].mean())})
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "selection_gap.csv"
        gap.to_csv(p, index=False)
        study.log_artifact(p)
    return gap


def finish_parent(study: DurableRun, table: pd.DataFrame, usage: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "trials.csv"
        table.to_csv(p, index=False)
        study.log_artifact(p)  # a journaled call keeps a copy of the file
    study.log_metrics(tracking.system(usage))
    failed = int((table.get("status") == "ERROR").sum()) if len(table) else 0
    study.terminate(True)
    if failed:
        print(f"[timevlm-platform] {failed} trial(s) failed; see the table and their MLflow runs", file=sys.stderr)


def record_bests(study: DurableRun, tracking_uri: str, experiment_id: str, spec: StudySpec,
                 cells: dict[str, Cell], table: pd.DataFrame) -> tuple[dict[str, pd.Series], list[str]]:
    """Each cell's best trial by the study's validation metric: marked, its model registered; returns the best
    rows by cell label and the registered model names (those waiting for the server included)."""
    bests, registered = {}, []
    for label, cell in cells.items():
        ok = table[(table["dataset"] == cell.dataset) & (table["horizon"] == cell.horizon)]
        if cell.test_dataset:
            ok = ok[ok["test_dataset"] == cell.test_dataset]
        ok = ok.dropna(subset=[spec.metric])
        if len(ok):
            best = ok.sort_values(spec.metric, ascending=spec.mode == "min").iloc[0]
            bests[label] = best
            name = _tag_best(study, tracking_uri, experiment_id, spec, cell, best, many_cells=len(spec.cells()) > 1)
            registered += [name] if name else []
    log_study_metrics(study, spec, bests)
    return bests, registered


def deliver_journals(study: DurableRun, timeout_s: float) -> dict[str, int]:
    """The end of the study: send what its trials and its own run journaled while MLflow was away (waiting up to
    timeout_s for the server), say how it went, and log the totals on the study's run."""
    root = study.root
    left = spool.flush_all(study.client, root, timeout_s, last=study.run_id)
    delayed, waiting = spool.delayed_counts(root)
    if delayed or waiting:
        how = ("all sent" if not waiting else
               f"{waiting} still waiting in {root} (MLflow did not answer for {timeout_s:.0f}s; runs "
               f"{', '.join(r[:8] for r in left)}; --resume sends them)")
        print(f"{PREFIX} MLflow: {delayed} call(s) were delayed while the tracking server was away; {how}",
              file=sys.stderr if waiting else sys.stdout, flush=True)
    study.log_metrics(tracking.system({"tracking_calls_delayed": delayed, "tracking_calls_waiting": waiting}))
    return {"delayed": delayed, "waiting": waiting}
