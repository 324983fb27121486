"""A federation with an OCT-only hospital, through real remdr-server / remdr-client processes."""

from __future__ import annotations

import numpy as np
import pytest
from e2e_helpers import check_report

from remdr.ops.loopback import Loopback, make_sites, write_experiment

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _drop_fundus(folder) -> None:
    """Make a site OCT-only, as a clinic without a fundus camera would be."""
    for path in folder.glob("*.npz"):
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "slo_fundus"}
        np.savez(path, **arrays)


def test_an_oct_only_site_joins_and_trains_only_the_parts_it_has_data_for(tmp_path):
    sites = make_sites(tmp_path / "data", ["A", "B"], n=24)
    _drop_fundus(sites["B"])
    fed = Loopback(tmp_path)
    out = tmp_path / "coord-run"
    experiment = write_experiment(
        tmp_path / "exp.toml", **{"out-dir": str(out), "num-server-rounds": 2}
    )
    try:
        fed.start_superlink()
        for name, data in sites.items():
            fed.start_site(name, data)
        assert fed.run(experiment, timeout=900) == 0, fed.log("run.log")
        report = check_report(out, rounds=2, sites={"A", "B"})
    finally:
        fed.stop()
    assert fed.leftovers() == []
    for rnd in report["rounds"]:
        assert rnd["aggregated"] == ["A", "B"]  # nobody screened out
        parts = rnd["part-aggregation"]  # the parts aggregated over their own trainers
        assert parts["fundus"] == ["A"] and parts["fusion"] == ["A"]
        assert parts.get("oct", ["A", "B"]) == ["A", "B"]
    for row in report["sites"]["B"]:
        assert row["eyes-fundus"] == 0 and row["eyes-complete"] == 0
        assert row["eyes-oct"] == row["num-examples"] > 0
