"""Checks before any trial starts: data that cannot be loaded and VLM variants that are not there (preflight), a
trial that no node can hold, and paths or VLM weights that the driver's node has but a worker node does not. Each fails with the node named, in seconds,
instead of a trial that waits forever for resources or fails on one node after Ray Train's retries."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from timevlm.config import RunEnv
from timevlm.data.splits import build_splits
from timevlm.errors import ConfigError
from timevlm.model.vlm.base import feature_dims
from timevlm_platform.study import StudySpec


@dataclass(frozen=True)
class NodeInfo:
    node_id: str
    ip: str
    cpus: float
    gpus: float

    @property
    def name(self) -> str:
        return f"{self.ip} ({self.node_id[:8]})"


def alive_nodes() -> list[NodeInfo]:
    import ray

    return [NodeInfo(n["NodeID"], n.get("NodeManagerAddress", "?"), n["Resources"].get("CPU", 0.0),
                     n["Resources"].get("GPU", 0.0)) for n in ray.nodes() if n.get("Alive")]


def check_trial_fits(study: str, workers: int, cpus: float, gpus: float, nodes: list[NodeInfo]) -> None:
    """Every worker of a trial must fit on one node, and the trial's workers on the cluster at once."""
    fits = [n for n in nodes if n.cpus >= cpus and n.gpus >= gpus]
    listing = "; ".join(f"{n.name}: {n.cpus:g} CPU, {n.gpus:g} GPU" for n in nodes) or "no alive node"
    ask = f"{workers} worker(s) x {cpus:g} CPU{f' + {gpus:g} GPU' if gpus else ''}"
    if not fits:
        raise ConfigError(f"study {study}: a trial asks for {ask}, but no node can hold one worker ({listing}); "
                          f"lower resources.cpus_per_worker/gpus_per_worker or add a larger node")
    slots = sum(min(int(n.cpus // cpus) if cpus else workers, int(n.gpus // gpus) if gpus else workers)
                for n in fits)
    if slots < workers:
        raise ConfigError(f"study {study}: a trial asks for {ask}, but the cluster holds only {slots} such "
                          f"worker(s) at once ({listing}); lower resources.workers_per_trial")


def _probe(paths: dict[str, str], vlm_configs: list[dict[str, Any]]) -> list[str]:
    """Run on one node: what of the study's inputs is missing or unusable there."""
    import os
    import tempfile

    problems = []
    for what, path in paths.items():
        if "://" in path:
            continue  # object storage: the same for every node
        if what.endswith("file") and not os.path.isfile(path):
            problems.append(f"{what} {path} does not exist")
        elif what.endswith("dir"):
            if what.startswith("writable"):
                try:  # a cache folder is made on first use; what matters is that the node can write there
                    os.makedirs(path, exist_ok=True)
                except OSError as e:
                    problems.append(f"{what} {path} cannot be created ({e.strerror})")
                    continue
            if not os.path.isdir(path):
                problems.append(f"{what} {path} does not exist")
            elif what.startswith("writable"):
                try:
                    with tempfile.NamedTemporaryFile(dir=path, prefix=".timevlm-probe-"):
                        pass
                except OSError as e:
                    problems.append(f"{what} {path} cannot be written ({e.strerror})")
    for cfg in vlm_configs:
        from timevlm.config import ModelConfig

        try:
            feature_dims(ModelConfig(**cfg))
        except Exception as e:  # noqa: BLE001
            problems.append(f"VLM {cfg['vlm']!r} ({cfg.get('vlm_path') or 'hub default'}) is not available: "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:160]}")
    return problems


def check_nodes_have_inputs(study: str, paths: dict[str, str], vlm_configs: list[dict[str, Any]],
                            nodes: list[NodeInfo], timeout_s: float = 120) -> None:
    """Probe every alive node (a zero-CPU task pinned to it) for the study's data files, a writable feature
    cache and the VLM weights; fail naming each node and what it lacks."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(_probe)
    refs = {n.name: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False))
            .remote(paths, vlm_configs) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    problems = {name: ray.get(ref) for name, ref in refs.items() if ref in ready}
    missing = [f"node {name}: {'; '.join(p)}" for name, p in problems.items() if p]
    silent = [name for name, ref in refs.items() if ref not in ready]
    if silent:
        missing.append(f"node(s) {', '.join(silent)} did not answer within {timeout_s:.0f}s")
    if missing:
        raise ConfigError(f"study {study}: not every node has what the trials need:\n  " + "\n  ".join(missing)
                          + "\n(on a cluster, put data and the feature cache on shared storage or the same path "
                            "on every node: --data-dir, --cache-dir)")


def searched_values(spec: StudySpec, key: str) -> list | None:
    """The values a study searches for `key` (a choice or grid), or None when it does not search it."""
    return next((p.args.get("values") for p in spec.search if p.key == key), None)


def preflight(spec: StudySpec, data_dir: str) -> dict[str, str]:
    """Load every (dataset, horizon, seq_len) a study can ask for before any trial starts, so bad data
    fails in seconds with the file named, not in every trial after Ray Train retries; and check that the VLM
    variants' weights are there. Returns the searched VLMs that cannot run here with why, when the study skips
    those (`unavailable_vlms: skip`); otherwise a missing VLM stops the study here."""
    seq_lens = searched_values(spec, "model.seq_len")
    vlms = searched_values(spec, "model.vlm")
    for cell in spec.cells():
        base = spec.experiment(cell.dataset, cell.horizon, {}, cell.test_dataset)
        for seq_len in seq_lens or [base.model.seq_len]:
            build_splits(base.placed(RunEnv(data_dir)).data, int(seq_len), cell.horizon, base.train.seed)
    skipped = {}
    for vlm in vlms or [base.model.vlm]:
        cfg = dataclasses.replace(base.model, vlm=vlm)
        try:
            feature_dims(cfg)  # reads the variant's config only; fails fast when the weights are not there
        except Exception as e:  # noqa: BLE001
            why = (f"VLM {vlm!r} is not available ({cfg.vlm_path or 'hub default'}): {type(e).__name__}: "
                   f"{str(e).splitlines()[0][:200]}")
            if vlms and spec.unavailable_vlms == "skip":
                skipped[vlm] = why
                continue
            raise ConfigError(f"{why}. Put its weights in the Hugging Face cache or set model.vlm_path to a local "
                              f"copy") from None
    if vlms and len(skipped) == len(vlms):
        raise ConfigError(f"study {spec.name}: none of the VLMs {vlms} can run here: "
                          f"{'; '.join(skipped.values())}")
    return skipped


def cluster_concurrency(spec: StudySpec) -> int:
    """How many trials the cluster holds at once (CPUs, GPUs, the study's max_concurrent); refuses a trial no
    node can hold."""
    import ray

    res = spec.resources
    check_trial_fits(spec.name, res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker, alive_nodes())
    total = ray.cluster_resources()
    by_cpu = int(total.get("CPU", 1) // max(res.workers_per_trial * res.cpus_per_worker, 1))
    limit = by_cpu
    if res.gpus_per_worker:
        limit = min(limit, int(total.get("GPU", 0) // (res.workers_per_trial * res.gpus_per_worker)))
    if limit < 1:
        raise ConfigError(f"study {spec.name}: the cluster ({total}) cannot fit one trial "
                          f"({res.workers_per_trial} workers x {res.cpus_per_worker} CPU, {res.gpus_per_worker} GPU)")
    return min(limit, res.max_concurrent) if res.max_concurrent else limit


def node_inputs(spec: StudySpec, data_dir: str, cache_dir: str, use_feature_cache: bool):
    """What every node must have: the study's data files, a writable feature cache, the VLM variants' weights."""
    from timevlm.data.files import dataset_path
    from timevlm.data.registry import get_dataset

    paths = {}
    for name in sorted({d for c in spec.cells() for d in (c.dataset, c.test_dataset) if d}):
        try:
            paths[f"{name} data file"] = str(dataset_path(get_dataset(name), data_dir))
        except Exception:  # noqa: BLE001 - datasets of several files (M4) are checked by their loader
            paths[f"{name} data dir"] = data_dir
    base = spec.experiment(spec.cells()[0].dataset, spec.cells()[0].horizon, {}, spec.cells()[0].test_dataset)
    if use_feature_cache and base.train.cache_fallback != "memory":
        paths["writable feature cache dir"] = cache_dir
    vlms = searched_values(spec, "model.vlm") or [base.model.vlm]
    configs = [{"vlm": v, "vlm_path": base.model.vlm_path} for v in vlms] if base.model.model == "timevlm" else []
    return paths, configs
