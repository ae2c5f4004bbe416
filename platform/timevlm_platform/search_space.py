"""A study on Ray Tune: how its cells map onto Tune experiments, its parameters as Tune's search space, its
searcher and scheduler."""
from __future__ import annotations

import json
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from timevlm_platform.study import VARIANT_KEY, Cell, Param, StudySpec


def tuner_groups(spec: StudySpec) -> list[tuple[str, list[Cell]]]:
    """How the study's cells map onto Tune experiments: (stable run name, cells). A grid study without
    early stopping runs every cell in one Tuner (cells become a `cell` grid parameter), so all its trials
    compete for the cluster's trial slots at once. A searched (Optuna) or ASHA study keeps one Tuner per
    cell: its searcher and scheduler must only compare trials of one dataset and horizon."""
    cells = spec.cells()
    if spec.searcher == "grid" and spec.scheduler.type == "fifo":
        return [(spec.name, cells)]
    return [(f"{spec.name}-{c.label}", [c]) for c in cells]


def to_domain(p: Param) -> Any:
    a = p.args
    return {
        "choice": lambda: tune.choice(a["values"]),
        "grid": lambda: tune.grid_search(a["values"]),
        "uniform": lambda: tune.uniform(a["low"], a["high"]),
        "loguniform": lambda: tune.loguniform(a["low"], a["high"]),
        "int": lambda: tune.randint(int(a["low"]), int(a["high"]) + 1),  # high inclusive
        "quniform": lambda: tune.quniform(a["low"], a["high"], a["q"]),
    }[p.kind]()


def param_space(spec: StudySpec) -> dict[str, Any]:
    """Flat {"model.d_model": domain, ...}; the trial's config carries these keys with sampled values.
    `seeds: N` (grid studies) repeats every grid point over N seeds; `variants` become a `variant` parameter."""
    space = {p.key: to_domain(p) for p in spec.search}
    if spec.variants:
        names = list(spec.variants)
        space[VARIANT_KEY] = tune.grid_search(names) if spec.searcher == "grid" else tune.choice(names)
    if spec.seeds > 1:
        space["train.seed"] = tune.grid_search([spec.seed + i for i in range(spec.seeds)])
    return space


class DistinctOptunaSearch(OptunaSearch):
    """OptunaSearch that does not hand out a configuration it already handed out, and that records trials in
    Optuna as they went (what optuna-dashboard shows).

    The paper's search spaces are small and discrete, where TPE (random during start-up) repeats itself
    often: three draws from 12 configurations repeat one about a quarter of the time. A repeat is told to
    Optuna as a failed trial (TPE ignores those) and Optuna is asked again; only once the space is used up
    is a repeat allowed. `_handed_out` is pickled with the searcher, so it survives Tuner.restore.

    Recorded in Optuna: the objective under the study's metric name (not "Objective 0"); one intermediate value
    per epoch at that epoch (Ray's OptunaSearch reports at Tune's iteration count, one past the last epoch for
    the final report with the test metrics); a trial the scheduler stopped as PRUNED (Ray tells it COMPLETE:
    only a finished trial's final report carries `test_mse`); each trial's MLflow run id as a user attribute.
    """

    max_redraws = 100
    FINAL_KEY = "test_mse"  # in a trial's final report only

    def _setup_study(self, mode):
        super()._setup_study(mode)
        if isinstance(self.metric, str) and self._ot_study.metric_names is None:
            import warnings

            import optuna

            with warnings.catch_warnings():  # "experimental since v3.2", once per study: not for the console
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                self._ot_study.set_metric_names([self.metric])

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is None or trial_id in self._completed_trials:
            return
        if result.get("mlflow_run_id"):
            ot_trial.set_user_attr("mlflow_run_id", result["mlflow_run_id"])
        if self.FINAL_KEY in result or self.metric not in result or "epoch" not in result:
            return
        ot_trial.report(result[self.metric], int(result["epoch"]))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        import optuna

        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and not error and self.FINAL_KEY not in result \
                and trial_id not in self._completed_trials:
            self._ot_study.tell(ot_trial, state=optuna.trial.TrialState.PRUNED)  # stopped by the scheduler
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result, error)

    def suggest(self, trial_id: str):
        import optuna

        handed_out = self.__dict__.setdefault("_handed_out", set())
        for _ in range(self.max_redraws):
            cfg = super().suggest(trial_id)
            if not isinstance(cfg, dict):
                return cfg
            key = json.dumps(cfg, sort_keys=True, default=str)
            if key not in handed_out:
                handed_out.add(key)
                return cfg
            self._ot_study.tell(self._ot_trials.pop(trial_id), state=optuna.trial.TrialState.FAIL)
        return cfg


def optuna_storage(url: str):
    """An Optuna RDB storage; SQLite gets a lock timeout, since the Tuners of a study's cells write to one file."""
    import optuna

    from timevlm_platform.tracking import first_use_lock

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite:") else {}
    with first_use_lock(url):  # its first client creates the tables: two studies at once must not race there
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)


def searcher(spec: StudySpec, storage: str | None = None, study_name: str | None = None) -> Searcher | None:
    """Optuna TPE, seeded (None for grid studies: Tune's own variant generator walks the grid). With `storage`
    every trial Optuna hands out and is told about is kept in that database under `study_name`."""
    if spec.searcher == "grid" or not spec.search:
        return None
    import optuna

    return DistinctOptunaSearch(sampler=optuna.samplers.TPESampler(seed=spec.seed), study_name=study_name,
                                storage=optuna_storage(storage) if storage else None)


def scheduler(spec: StudySpec) -> TrialScheduler:
    if spec.scheduler.type == "asha" and spec.epochs > spec.scheduler.grace_period:
        # max_t one past the last epoch: ASHA stops a trial when it *reaches* max_t, which would cut off a
        # finishing trial before its final report (test metrics) and orphan its Train workers.
        return ASHAScheduler(time_attr="epoch", max_t=spec.epochs + 1, grace_period=spec.scheduler.grace_period,
                             reduction_factor=spec.scheduler.reduction_factor)
    return FIFOScheduler()


def num_samples(spec: StudySpec) -> int:
    """Grid studies run each grid point once (Tune multiplies num_samples by the grid size)."""
    return 1 if spec.searcher == "grid" else spec.trials


def searcher_kind(spec: StudySpec) -> str:
    return "optuna" if spec.searcher != "grid" and spec.search else "grid"


def forget_optuna_study(storage: str, name: str) -> None:
    import optuna

    try:
        optuna.delete_study(study_name=name, storage=storage)
    except KeyError:  # no such study yet
        pass
