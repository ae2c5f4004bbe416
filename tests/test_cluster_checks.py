"""Bad input at the cluster's edge is caught before any trial starts, with the node named."""
from __future__ import annotations

import pytest
import ray

from timevlm.errors import ConfigError
from timevlm_platform.cluster_checks import NodeInfo, alive_nodes, check_nodes_have_inputs, check_trial_fits

NODES = [NodeInfo("a" * 16, "10.0.0.1", 8, 0), NodeInfo("b" * 16, "10.0.0.2", 4, 1)]


def test_a_worker_larger_than_any_node_is_refused_naming_the_nodes():
    check_trial_fits("s", 1, 8, 0, NODES)  # fits the first node
    check_trial_fits("s", 3, 4, 0, NODES)  # two on the first, one on the second
    with pytest.raises(ConfigError, match=r"no node can hold one worker \(10\.0\.0\.1 \(aaaaaaaa\): 8 CPU, 0 GPU"):
        check_trial_fits("s", 1, 12, 0, NODES)  # 12 CPUs in all, but not on one node
    with pytest.raises(ConfigError, match="no node can hold one worker"):
        check_trial_fits("s", 1, 8, 1, NODES)  # the GPU node has 4 CPUs
    with pytest.raises(ConfigError, match=r"holds only 3 such worker\(s\) at once"):
        check_trial_fits("s", 4, 4, 0, NODES)


def test_every_node_is_probed_for_data_cache_and_vlm(tmp_path):
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        nodes = alive_nodes()
        ok = tmp_path / "ETTh1.csv"
        ok.write_text("x")
        check_nodes_have_inputs("s", {"ETTh1 data file": str(ok), "writable feature cache dir": str(tmp_path / "c")},
                                [{"vlm": "custom", "vlm_path": None}], nodes)
        assert (tmp_path / "c").is_dir()  # the probe made the cache folder where it was missing
        with pytest.raises(ConfigError) as e:
            check_nodes_have_inputs("s", {"ETTh2 data file": str(tmp_path / "ETTh2.csv")},
                                    [{"vlm": "clip", "vlm_path": str(tmp_path / "no-clip")}], nodes)
        msg = str(e.value)
        assert f"node {nodes[0].name}" in msg and "ETTh2.csv does not exist" in msg
        assert "VLM 'clip'" in msg and "no-clip" in msg
    finally:
        ray.shutdown()
