"""End-to-end on loopback with real flower-superlink / flower-supernode processes."""

from __future__ import annotations

import json
import re

import pytest
import torch
from e2e_helpers import check_report, initial_weights, wait_for

from remdr.federation.run_directory import RunDirectory
from remdr.ops.loopback import EXPERIMENT, Loopback, make_sites, write_experiment
from remdr.ops.pki import make_deployment


def _without_validation(record: dict) -> dict:
    record = {k: v for k, v in record.items() if k != "evaluate"}
    record["sites"] = {
        site: {k: v for k, v in m.items() if not k.startswith("eval-")}
        for site, m in record.get("sites", {}).items()
    }
    return record


pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture()
def sites(tmp_path):
    return make_sites(tmp_path / "data", ["A", "B"])


@pytest.mark.parametrize("secure", [False, True], ids=["insecure", "tls-node-auth"])
def test_two_sites_two_rounds(tmp_path, sites, secure):
    certs = (
        make_deployment(tmp_path / "certs", ["127.0.0.1", "localhost"], ["A", "B"])
        if secure
        else None
    )
    fed = Loopback(tmp_path, certs=certs)
    out = tmp_path / "coord-run"
    experiment = write_experiment(tmp_path / "exp.toml", **{"out-dir": str(out)})
    try:
        fed.start_superlink()
        if secure:
            for name in sites:
                fed.register(name)
        for name, data in sites.items():
            fed.start_site(name, data)
        assert fed.run(experiment) == 0, fed.log("run.log")
        check_report(out, rounds=2, sites={"A", "B"})
        # the last step's sums crossed each site's worker and the coordinator's screening
        assert RunDirectory(out).best()["head-refit"]["sites"] == ["A", "B"]
        final = RunDirectory(out).load_weights(2)
        initial = initial_weights(EXPERIMENT)
        assert final.keys() == initial.keys()
        assert any(not torch.equal(final[k].to(initial[k].dtype), initial[k]) for k in initial)
    finally:
        fed.stop()
    assert fed.leftovers() == []


def test_resume_after_the_coordinator_is_killed(tmp_path, sites):
    fed = Loopback(tmp_path)
    out = tmp_path / "coord-run"
    experiment = write_experiment(
        tmp_path / "exp.toml", **{"out-dir": str(out), "num-server-rounds": 3}
    )
    try:
        fed.start_superlink()
        for name, data in sites.items():
            fed.start_site(name, data)
        first = fed.run(experiment, background=True)
        wait_for(lambda: RunDirectory(out).last_round() >= 1, 300, "round 1 checkpoint")
        fed.stop_superlink()  # the coordinator dies mid-run
        fed.group.stop_one(first)
        done_before = RunDirectory(out).last_round()
        assert 1 <= done_before < 3
        before = {p.name: p.read_bytes() for p in out.glob("round-*")}
        run_key = (out / "run-key").read_text()
        log_offset = len(fed.log("run.log", tail=10**9))
        fed.start_superlink()  # restart: same state folder, same run directory
        assert fed.run(experiment) == 0, fed.log("run.log")
        report = check_report(out, rounds=3, sites={"A", "B"})
        resumed_log = fed.log("run.log", tail=10**9)[log_offset:]
        assert f"after round {done_before} of 3" in resumed_log
        # no round runs twice: the resumed run trains exactly the missing rounds, once each,
        # and leaves the checkpoints of the finished rounds untouched
        ran = [int(r) for r in re.findall(r"remdr round (\d+)/3:", resumed_log)]
        assert ran == list(range(done_before + 1, 4)), resumed_log
        # the finished rounds' weights are untouched; their records only gain the sites'
        # validation of their model, which arrives with the next round's train replies
        for name, data in before.items():
            if name.endswith(".json"):
                now = json.loads((out / name).read_text())
                assert _without_validation(json.loads(data)) == _without_validation(now)
            else:
                assert (out / name).read_bytes() == data, name
        assert len(report["rounds"]) == 3
        # the same run for the sites: their cross-round state, beside their ledgers, continued
        assert (out / "run-key").read_text() == run_key
        for name in sites:
            state = tmp_path / f"ledger-{name}-site-state" / run_key
            assert sorted(p.name for p in state.glob("round-*")) == [
                "round-000002.safetensors",
                "round-000003.safetensors",
            ]
    finally:
        fed.stop()
    assert fed.leftovers() == []
