"""Checks at the cluster's edge, before any trial starts: a trial that no node can hold, and paths or VLM
weights that the driver's node has but a worker node does not. Each fails with the node named, in seconds,
instead of a trial that waits forever for resources or fails on one node after Ray Train's retries."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from timevlm.errors import ConfigError


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
        from timevlm.model.vlm.base import feature_dims

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
