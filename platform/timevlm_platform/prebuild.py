"""Build every VLM feature-cache entry a study needs before its trials start: one Ray Data batch-inference
job (`map_batches` over an actor pool that holds the frozen VLM, GPU actors when the cluster has GPUs), with
one progress bar for the whole build. The trials then only read the cache.

Which entries a study needs: every cell x variant x grid (or choice) value of the searched parameters, reduced
to what changes the features (dataset, splits, seq_len, image and prompt settings, VLM). A searched parameter
with a continuous range that changes the features (rare) cannot be listed; then those entries are left to the
trials, which build a missing entry themselves under the cache's lock, as before. An entry already in the cache
costs nothing but its share of one directory listing.
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from tqdm.auto import tqdm

from timevlm.config import ExperimentConfig, RunEnv
from timevlm.experiment import feature_plan
from timevlm.features import FeatureCache, SplitFeatures, cache_key
from timevlm.model.multimodal import FEATURE_FIELDS, needs_features
from timevlm.overrides import SettingKey
from timevlm_platform.study import VARIANT_KEY, StudySpec

WINDOWS_PER_BATCH = 256


@dataclass(frozen=True)
class FeatureJob:
    """One cache entry to build: the experiment that defines it and which of its splits."""

    key: str
    experiment: dict[str, Any]  # ExperimentConfig.to_dict(), with data_dir set
    split: str
    n_windows: int
    settings: dict[str, Any]  # the encoder settings, stored with the entry


@dataclass
class PrebuildReport:
    needed: int = 0  # distinct entries the study's trials will read
    present: int = 0  # of those, already in the cache
    built: int = 0
    windows: int = 0
    seconds: float = 0.0
    nodes: tuple[str, ...] = ()  # Ray node ids whose actors computed features
    skipped: str = ""  # why some entries are left to the trials, if any
    elsewhere: int = 0  # entries another builder (a trial, another study) held the lock of: left to it

    def line(self) -> str:
        if not self.needed:
            return "no VLM features needed"
        s = f"{self.needed} feature entries needed, {self.present} already cached"
        if self.built:
            s += (f", {self.built} built ({self.windows:,} windows) in {self.seconds:.0f}s on "
                  f"{len(self.nodes)} node(s)")
        if self.elsewhere:
            s += f", {self.elsewhere} being built by another study or trial (its trials wait for them)"
        return s + (f"; {self.skipped}" if self.skipped else "")


def _grid_values(spec: StudySpec) -> tuple[list[dict[str, Any]], str]:
    """Every combination of listable searched values (and variants); the reason if some could not be listed."""
    axes, unlisted = [], []
    for p in spec.search:
        if "values" in p.args:
            axes.append([(p.key, v) for v in p.args["values"]])
        else:  # a range: one value stands for all, which is exact unless the key changes the features
            key = SettingKey.parse(p.key)
            if key.section == "data" or key.field in FEATURE_FIELDS:
                unlisted.append(p.key)
            axes.append([(p.key, p.args["low"])])
    if spec.variants:
        axes.append([(VARIANT_KEY, v) for v in spec.variants])
    combos = [dict(c) for c in itertools.product(*axes)] if axes else [{}]
    why = f"{', '.join(unlisted)} searched over a range: entries for other values are built by trials" if unlisted else ""
    return combos, why


def study_jobs(spec: StudySpec, data_dir: str) -> tuple[list[FeatureJob], str]:
    """The distinct cache entries of every trial the study can run (grid and choice values listed), and why
    some were left to the trials, if any. In a searched (Optuna) study whose samples change the features
    (seq_len, VLM, image size, ...) only the trials know what they need, so those cells are left to them."""
    combos, why = _grid_values(spec)
    reasons = [why] if why else []
    seen: dict[str, FeatureJob] = {}
    for cell in spec.cells():
        plans: dict[str, ExperimentConfig] = {}
        for params in combos:
            exp = spec.experiment(cell.dataset, cell.horizon, params, cell.test_dataset).placed(RunEnv(data_dir))
            plans.setdefault(json.dumps([exp.data.__dict__, _feature_fields(exp)], sort_keys=True, default=str), exp)
        if spec.searcher != "grid" and len(plans) > 1:
            reasons.append(f"{cell.label}: Optuna samples settings that change the features; its trials build them")
            continue
        for exp in plans.values():  # e.g. norm_const or d_model values share one plan: same features
            plan = feature_plan(exp)
            if plan is None:
                continue
            settings, splits = plan
            for name, split in splits.items():
                key = cache_key(settings, split)
                seen.setdefault(key, FeatureJob(key, exp.to_dict(), name, len(split), settings))
    return list(seen.values()), "; ".join(reasons)


def _feature_fields(exp: ExperimentConfig) -> dict[str, Any]:
    return {"needs": needs_features(exp.model), **{k: getattr(exp.model, k) for k in FEATURE_FIELDS}}


class _Encoder:
    """Ray Data actor: the frozen VLM(s) and the splits of the jobs, loaded once per actor."""

    def __init__(self, jobs: list[FeatureJob], device: str) -> None:
        import ray

        from timevlm_platform.console import quiet_worker

        quiet_worker()
        torch.set_num_threads(1)
        self.jobs, self.device = jobs, device
        self.offsets = np.cumsum([0] + [j.n_windows for j in jobs])
        self.node = ray.get_runtime_context().get_node_id()
        self._encoders: dict[str, Any] = {}
        self._splits: dict[int, Any] = {}
        self._plans: dict[str, dict[str, Any]] = {}  # experiment -> its splits

    def _job(self, j: int):
        """(encoder, split) of job j. The VLM's weights are loaded once per actor and variant; only the cheap
        VAL/TAL front end (image size, prompt's horizon, ...) differs between jobs."""
        if j not in self._splits:
            from timevlm.data.registry import get_dataset
            from timevlm.model.multimodal import MultimodalEncoder
            from timevlm.model.vlm import load_vlm
            from timevlm.model.vlm.base import vlm_identity

            exp = ExperimentConfig.from_dict(self.jobs[j].experiment)
            mcfg = exp.model
            ident = json.dumps({**vlm_identity(mcfg), "vision_tokens": mcfg.vision_tokens,
                                "max_prompt_tokens": mcfg.max_prompt_tokens}, sort_keys=True, default=str)
            if ident not in self._encoders:
                self._encoders[ident] = load_vlm(mcfg, self.device)
            encoder = MultimodalEncoder(mcfg, self._encoders[ident], get_dataset(exp.data.dataset).freq)
            plan_key = json.dumps(self.jobs[j].experiment, sort_keys=True, default=str)
            if plan_key not in self._plans:  # one experiment's three splits are three jobs: load them once
                self._plans[plan_key] = feature_plan(exp)[1]
            self._splits[j] = (encoder, self._plans[plan_key][self.jobs[j].split])
        return self._splits[j]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = batch["data"].astype(np.int64)
        job_of = np.searchsorted(self.offsets, ids, side="right") - 1
        vision, text = [None] * len(ids), [None] * len(ids)
        for j in np.unique(job_of):
            rows = np.nonzero(job_of == j)[0]
            encoder, split = self._job(int(j))
            feats = encoder(split.inputs(ids[rows] - self.offsets[j]))
            for r, v, t in zip(rows, feats["vision"].cpu().numpy(), feats["text"].cpu().numpy()):
                vision[r], text[r] = v, t
        return {"data": ids, "vision": np.stack(vision), "text": np.stack(text),
                "node": np.array([self.node] * len(ids))}


def prebuild_features(spec: StudySpec, data_dir: str, cache_dir: str, *, max_actors: int | None = None,
                      progress: bool = True) -> PrebuildReport:
    """Build the study's missing feature entries on the cluster (Ray must be initialised)."""
    t0 = time.perf_counter()
    jobs, why = study_jobs(spec, data_dir)
    cache = FeatureCache(cache_dir)
    present = cache.keys()
    todo = [j for j in jobs if j.key not in present]
    report = PrebuildReport(needed=len(jobs), present=len(jobs) - len(todo), skipped=why)
    # Take each missing entry's cache lock (the one a trial's get_or_build takes): an entry another study or
    # trial is building right now is left to it, so two studies sharing a cache build each entry once.
    locks = {}
    for j in todo:
        lock = cache.lock(j.key)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        locks[j.key] = lock
    try:
        mine = [j for j in todo if j.key in locks and not cache.exists(j.key)]
        report.elsewhere = len([j for j in todo if j.key not in locks])
        report.present += len([j for j in todo if j.key in locks]) - len(mine)
        return _build(mine, cache, report, locks, max_actors, progress, t0) if mine else report
    finally:
        for lock in locks.values():
            lock.release()


def _build(todo: list[FeatureJob], cache: FeatureCache, report: PrebuildReport, locks: dict[str, FileLock],
           max_actors: int | None, progress: bool, t0: float) -> PrebuildReport:
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    slots = gpus or max(1, int(resources.get("CPU", 1)))
    total = int(sum(j.n_windows for j in todo))
    actors = max(1, min(max_actors or slots, slots, -(-total // WINDOWS_PER_BATCH)))
    ctx = ray.data.DataContext.get_current()
    # one bar over the windows (below) instead of Ray Data's operator bars, which, when stdout is not a
    # terminal (a log, `ray job submit`), turn into a block of log lines every 10 s
    ctx.enable_progress_bars = False
    # The window ids go in as in-memory blocks (no read tasks): on a cluster whose every CPU holds an encoder
    # actor, read tasks would wait for a CPU forever.
    ids = np.array_split(np.arange(total, dtype=np.int64), max(actors * 4, -(-total // (4 * WINDOWS_PER_BATCH))))
    ds = ray.data.from_numpy([b for b in ids if len(b)]).map_batches(
        _Encoder, fn_constructor_kwargs={"jobs": todo, "device": "cuda" if gpus else "cpu"},
        batch_size=WINDOWS_PER_BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
        **({"num_gpus": 1} if gpus else {"num_cpus": 1}))
    # Each entry is written as soon as all its windows are back, so the driver holds only the entries still
    # in flight (a long_term study needs ~1M windows, ~20 GB of features in all).
    offsets = np.cumsum([0] + [j.n_windows for j in todo])
    pending: dict[int, tuple[np.ndarray, np.ndarray, list[int]]] = {}
    nodes: set[str] = set()
    bar = tqdm(total=total, unit="window", desc="VLM features", disable=not progress, mininterval=5)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        bar.update(len(batch["data"]))
        nodes.update(batch["node"].tolist())
        ids = batch["data"]
        job_of = np.searchsorted(offsets, ids, side="right") - 1
        for j in np.unique(job_of):
            j = int(j)
            rows = job_of == j
            if j not in pending:
                n = todo[j].n_windows
                pending[j] = (np.empty((n, *batch["vision"].shape[1:]), np.float32),
                              np.empty((n, *batch["text"].shape[1:]), np.float32), [0])
            vision, text, filled = pending[j]
            local = ids[rows] - offsets[j]
            vision[local], text[local] = batch["vision"][rows], batch["text"][rows]
            filled[0] += int(rows.sum())
            if filled[0] == todo[j].n_windows:
                cache.put(todo[j].key, SplitFeatures(torch.from_numpy(vision), torch.from_numpy(text)),
                          todo[j].settings)
                locks.pop(todo[j].key).release()  # a trial waiting for this entry can read it now
                del pending[j]
    bar.close()
    if pending:
        raise RuntimeError(f"feature batch job returned incomplete entries: {[todo[j].key for j in pending]}")
    report.built, report.windows = len(todo), total
    report.seconds, report.nodes = time.perf_counter() - t0, tuple(sorted(nodes))
    return report
