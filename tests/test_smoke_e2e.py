"""The fast tier's one end-to-end run: 2 sites, 1 round, real SuperLink and SuperNodes on loopback.

Started through `remdr-server` / `remdr-client` as a hospital and a coordinator would; the slow
tier (`make test-e2e`) adds TLS, resume, faults, the proxy, the chaos drill and simulations.
"""

from __future__ import annotations

import pytest
import torch
from e2e_helpers import check_report, initial_weights

from remdr.federation.run_directory import RunDirectory
from remdr.ops.loopback import EXPERIMENT, Loopback, make_sites, write_experiment

pytestmark = pytest.mark.e2e


def test_two_sites_one_round_through_real_flower_processes(tmp_path):
    sites = make_sites(tmp_path / "data", ["A", "B"], n=24)
    fed = Loopback(tmp_path, sites_per_machine=2)
    out = tmp_path / "coord-run"
    experiment = write_experiment(
        tmp_path / "exp.toml", **{"out-dir": str(out), "num-server-rounds": 1}
    )
    try:
        fed.start_superlink()
        for name, data in sites.items():
            fed.start_site(name, data)
        assert fed.run(experiment, timeout=600) == 0, fed.log("run.log")
        report = check_report(out, rounds=1, sites={"A", "B"})
        assert report["rounds"][0]["aggregated"] == ["A", "B"]
        final, initial = RunDirectory(out).load_weights(1), initial_weights(EXPERIMENT)
        assert final.keys() == initial.keys()
        assert any(not torch.equal(final[k].to(initial[k].dtype), initial[k]) for k in initial)
        for name in sites:  # each site's long-lived worker ran its messages, not a fresh process
            log = fed.log(f"site-{name}.log", tail=100_000)
            assert "site worker: train round 1" in log
            # two sites share this machine: each trains with its share of the cores
            assert f"({fed.threads} torch threads)" in log
    finally:
        fed.stop()
    assert fed.leftovers() == []
