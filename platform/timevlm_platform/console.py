"""What a person reads while a study runs: one line per finished trial, and the sources of repeated noise
switched off where they start (each with the reason)."""
from __future__ import annotations

import logging
import os
from typing import Any

from ray import tune

from timevlm.overrides import short_name

PREFIX = "[timevlm-platform]"


def _short(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def trial_line(label: str, config: dict[str, Any], trial_id: str, result: dict[str, Any], metric: str,
               status: str, n_done: int) -> str:
    values = " ".join(f"{short_name(k)}={_short(v)}" for k, v in config.items() if k != "cell")
    head = " ".join(filter(None, [f"{PREFIX} trial {n_done}", label, values, f"#{trial_id.rsplit('_', 1)[-1]}"]))
    epochs, secs = result.get("epoch", 0), result.get("time_total_s", 0.0)
    if status == "ERROR":
        return f"{head}: failed after {epochs} epoch(s) ({secs:.0f}s); see its MLflow run"
    if "test_mse" not in result:
        return f"{head}: stopped by ASHA at epoch {epochs}, {metric} {result.get(metric, float('nan')):.4f} ({secs:.0f}s)"
    return (f"{head}: {metric} {result.get(metric, float('nan')):.4f}, test MSE {result['test_mse']:.4f}, "
            f"MAE {result['test_mae']:.4f} ({epochs} epochs, {secs:.0f}s)")


class TrialLines(tune.Callback):
    """Print one line as each trial of a Tune experiment finishes, fails or is stopped early."""

    def __init__(self, ctx) -> None:
        self.ctx = ctx
        self.done = 0

    def _print(self, trial, status: str) -> None:
        self.done += 1
        cell = self.ctx.cell_of(trial.config)
        print(trial_line(cell.label, trial.config, trial.trial_id, trial.last_result or {}, self.ctx.spec.metric,
                         status, self.done), flush=True)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trial, "DONE")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._print(trial, "ERROR")


def quiet_worker() -> None:
    """In a process that loads models or MLflow artifacts for a trial (Train worker, prebuild actor): progress
    bars there are interleaved from several processes into the driver's console and say nothing a person
    needs (weights load in well under a second from local files); the study's own lines report progress."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # with a tracking server, MLflow prints "View run <name> at: <url>" each time a run is ended
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # "Validating input example ..." per logged model
    try:  # Train V2 logs every ray.train.report at INFO on a logger named by its file path, outside `ray.train`
        # (so the run's LoggingConfig does not reach it): "Reporting training result N: TrainingReport(...)"
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except ImportError:
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


class _DropMessage(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def quiet_driver(verbose: int = 1) -> None:
    """The driver's console: Optuna logs a line per study it creates or loads (one per cell); Ray Data logs its
    plan at INFO and, because the feature build turns its bars off for our own bar, a warning that they are
    off; Tune's console (a configuration box, status tables every 30 s, each trial's config and result as
    boxes) is Tune's "new output" engine, whose verbose=0 still prints the boxes: the classic one is silent."""
    import optuna

    if verbose >= 2:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # a logger's filters see only the records logged on it, not its children's: filter where it is logged
    logging.getLogger("ray.data._internal.progress").addFilter(_DropMessage("Progress bars disabled"))
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
