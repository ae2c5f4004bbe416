"""Bad input at the cluster's edge is caught before any trial starts, with the node named."""
from __future__ import annotations

import pytest
import ray

from timevlm.errors import ConfigError
from timevlm_platform.cluster_checks import NodeInfo, alive_nodes, check_nodes_have_inputs, check_trial_fits, preflight

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


def test_a_vlm_without_weights_stops_the_study_unless_the_study_skips_it(tmp_path):
    """vilt's weights are not where the study runs (a folder without them): by default the study stops before
    any trial, naming the VLM; with `unavailable_vlms: skip` the others run and the skipped one says why."""
    from conftest import ett_frame
    from timevlm_platform.study import parse_study

    ett_frame().to_csv(tmp_path / "ETTh1.csv", index=False)
    study = {"name": "vlms", "datasets": ["ETTh1"], "horizons": [24], "searcher": "grid",
             "fixed": {"model": {"seq_len": 48, "vlm_path": str(tmp_path / "no_weights")}},
             "search": {"model.vlm": {"type": "grid", "values": ["custom", "vilt"]}}}
    with pytest.raises(ConfigError, match=r"VLM 'vilt' is not available .*no_weights.*set model.vlm_path"):
        preflight(parse_study(study), str(tmp_path))
    spec = parse_study({**study, "unavailable_vlms": "skip"})
    skipped = preflight(spec, str(tmp_path))
    assert list(skipped) == ["vilt"] and "no_weights" in skipped["vilt"]
    runs = spec.without_values("model.vlm", list(skipped))
    assert [p.args["values"] for p in runs.search] == [["custom"]] and runs.name == spec.name
    with pytest.raises(ConfigError, match="none of the VLMs"):
        preflight(parse_study({**study, "unavailable_vlms": "skip",
                               "search": {"model.vlm": {"type": "grid", "values": ["vilt", "clip"]}}}), str(tmp_path))
    with pytest.raises(ConfigError, match="unavailable_vlms: 'maybe' must be error or skip"):
        parse_study({**study, "unavailable_vlms": "maybe"})
