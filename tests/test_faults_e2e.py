"""Faults a multi-site study meets, survived by a real federation on loopback."""

from __future__ import annotations

import json

import pytest
import torch
from e2e_helpers import wait_for
from remdr.client.cli import DRILL_ENV
from remdr.client.fault_drill import FAULT_ENV

from remdr.federation.run_directory import RunDirectory
from remdr.ops.loopback import Loopback, make_sites, write_experiment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_a_hostile_round_a_bad_update_and_a_site_that_dies(tmp_path):
    """Four sites: M sends a NaN update in round 1 and an absurd one in round 2; C dies after
    round 1; A has corrupt files. Both rounds finish with the sites that behaved (A training on
    its good files), and the report says who did what."""
    sites = make_sites(tmp_path / "data", ["A", "B", "C", "M"])
    for path in sorted(sites["A"].glob("*.npz"))[:2]:  # A's disk has two corrupt files
        path.write_bytes(path.read_bytes()[:64])
    fed = Loopback(tmp_path)
    out = tmp_path / "coord-run"
    experiment = write_experiment(
        tmp_path / "exp.toml",
        **{"out-dir": str(out), "min-nodes": 4, "round-timeout": 180.0, "node-wait": 10.0},
    )
    try:
        fed.start_superlink()
        for name, data in sites.items():
            # every site opts in to the drill's ClientApp; M sends bad updates
            drill = {DRILL_ENV: "1", **({FAULT_ENV: "nan,norm"} if name == "M" else {})}
            fed.start_site(name, data, env=drill)
        run = fed.run(experiment, background=True, fault_drill=True)
        wait_for(lambda: RunDirectory(out).last_round() >= 1, 300, "round 1 checkpoint")
        fed.kill_site("C")
        wait_for(lambda: run.poll() is not None, 400, "the run to finish")
        assert run.returncode == 0, fed.log("run.log")
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "completed"
        one, two = report["rounds"]
        assert [one["round"], two["round"]] == [1, 2]
        assert one["rejected"] == ["M"] and one["aggregated"] == ["A", "B", "C"]
        assert two["rejected"] == ["M"] and two["aggregated"] == ["A", "B"]
        reasons = [e["reason"] for e in one["errors"] + two["errors"] if e["site"] == "M"]
        assert any("non-finite" in r for r in reasons) and any("norm" in r for r in reasons)
        missing = json.dumps(two.get("missing", {})) + json.dumps(two.get("errors", []))
        assert '"C"' in missing, two
        assert all(row["skipped-records"] == 2 for row in report["sites"]["A"])
        assert all(row["num-examples"] > 0 for row in report["sites"]["A"])  # A still trains
        final = RunDirectory(out).load_weights(2)
        assert all(torch.isfinite(v.float()).all() for v in final.values())
        assert "update rejected" in fed.log("run.log", tail=10**7)
    finally:
        fed.stop()
    assert fed.leftovers() == []
