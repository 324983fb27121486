"""End-to-end on loopback with real flower-superlink / flower-supernode processes."""

from __future__ import annotations

import json

import pytest
import torch

from remdr.federation.run_config import split_run_config
from remdr.federation.run_directory import RunDirectory
from remdr.methods import build_model
from remdr.ops.loopback import Loopback, make_sites, wait_for, write_experiment
from remdr.ops.pki import make_deployment

pytestmark = pytest.mark.e2e


@pytest.fixture()
def sites(tmp_path):
    return make_sites(tmp_path / "data", ["A", "B"])


def _initial_weights(experiment: dict) -> dict[str, torch.Tensor]:
    cfg, _ = split_run_config(experiment)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg).state_dict()


def _check_report(out, rounds: int) -> dict:
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    assert set(report["sites"]) == {"A", "B"}
    for site_rows in report["sites"].values():
        assert [row["round"] for row in site_rows] == list(range(1, rounds + 1))
        assert all(row["num-examples"] > 0 and row["eval-val-mse"] is not None for row in site_rows)
    for r in range(1, rounds + 1):
        assert (out / f"round-{r:03d}.safetensors").is_file()
    assert (out / "best.safetensors").is_file() and (out / "learning_curves.png").is_file()
    return report


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
        _check_report(out, rounds=2)
        final = RunDirectory(out).load_weights(2)
        initial = _initial_weights(
            {"image-size": 32, "n-bscans": 2, "embed-dim": 16, "fusion-hidden": 16}
        )
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
        wait_for(lambda: RunDirectory(out).last_round() >= 1, 600, "round 1 checkpoint")
        fed.stop_superlink()  # the coordinator dies mid-run
        fed.group.stop_one(first)
        done_before = RunDirectory(out).last_round()
        assert 1 <= done_before < 3
        fed.start_superlink()  # restart: same state folder, same run directory
        assert fed.run(experiment) == 0, fed.log("run.log")
        report = _check_report(out, rounds=3)
        assert "resuming from" in fed.log("run.log", tail=10**7)
        assert len(report["rounds"]) == 3  # no duplicated rounds
    finally:
        fed.stop()
    assert fed.leftovers() == []
