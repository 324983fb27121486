"""A hostile coordinator cannot spend a site's privacy (issue 23), end to end on real Flower
processes: sites started with `remdr-client start`, runs submitted with `remdr-server run`.

Each hostile run config (a higher ceiling, a larger delta, another ClientApp, per-bin metrics
from a site that requires DP) is refused at the site in one line, spends nothing (the ledger is
unchanged), and the coordinator's report names the refusal. And a site started exactly as the
README shows stops at its own ceiling however much the run config asks for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from remdr.ops.loopback import BIN, Loopback, make_sites, write_experiment
from remdr.ops.pki import make_deployment
from remdr.ops.processes import flower_env, free_port
from remdr.privacy import PrivacyLedger, epsilon_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SITE_CEILING = 10.0  # remdr.client.site_policy.SITE_EPSILON_MAX: a site that sets none
# A private method whose round is one DP-SGD step over all of a site's patients (q = 1): the
# epsilon of k rounds at sigma s is epsilon_of([(s, 1.0, k)], delta).
PRIVATE = {
    "method": "remdr_dp",
    "oct-view": "rnflt",
    "batch-size": 256,
    "min-nodes": 1,
    "num-server-rounds": 1,
}


def start_site(fed: Loopback, name: str, data: Path, *flags: str, env: dict | None = None):
    """`remdr-client start` with exactly these flags (Loopback's own adds a ledger and threads)."""
    port = free_port()
    fed.node_ports.append(port)
    fed.group.markers.append(f"127.0.0.1:{port}")
    auth = ["--key", str(fed.certs / "keys" / name)] if fed.certs else []
    cmd = [
        str(BIN / "remdr-client"), "start", "--data", str(data), "--site-id", name,
        "--superlink", fed.address, *fed.tls_args(), *auth, "--port", str(port), *flags,
    ]  # fmt: skip
    env = {**flower_env(), **(env or {})}
    fed.sites[name] = (fed.group.start(cmd, fed.root / f"site-{name}.log", env), port)


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _refusal(report: dict, site: str) -> str:
    """The one-line reason the site gave in round 1's train phase, as the report records it."""
    record = report["rounds"][0]
    errors = [e for e in record.get("errors", []) if e["phase"] == "train"]
    assert len(errors) == 1, f"the site was not refused: {record.get('sites')}"
    reason = errors[0]["reason"]  # the coordinator may know the site only by its node
    assert reason.startswith(f"site {site}: ") and "\n" not in reason
    return reason


def test_hostile_run_configs_are_refused_at_the_site_and_spend_nothing(tmp_path):
    data = make_sites(tmp_path / "data", ["hospA"])["hospA"]
    ledger = tmp_path / "hospA" / "privacy-ledger.jsonl"
    fed = Loopback(tmp_path)
    hostile = {
        "ceiling": ({"dp-noise": 0.3, "dp-epsilon-max": 1e9}, [f"ceiling {SITE_CEILING:g}"]),
        # at delta 0.02 this round costs 6.4, under the ceiling; at the site's 1e-5, 10.7
        "delta": ({"dp-noise": 0.5, "dp-delta": 0.02}, ["delta 1e-05", "privacy budget"]),
        "clientapp": ({"dp-noise": 2.0}, ["remdr.client.fault_drill:app", "runs only"]),
        "metrics": ({"dp-noise": 2.0, "share-metrics": "full"}, ["share-metrics=full"]),
    }
    from remdr.federation.run_config import run_config_defaults

    if "share-metrics" not in run_config_defaults():  # the coordinator must know the key
        del hostile["metrics"]
    try:
        fed.start_superlink()
        start_site(fed, "hospA", data, "--ledger", str(ledger), "--require-dp")
        for name, (config, says) in hostile.items():
            out = tmp_path / f"run-{name}"
            exp = write_experiment(
                tmp_path / f"{name}.toml", **PRIVATE, **config, **{"out-dir": str(out)}
            )
            before = ledger.read_bytes() if ledger.exists() else b""
            fed.run(exp, fault_drill=name == "clientapp")
            reason = _refusal(_report(out), "hospA")
            assert all(s in reason for s in says), (name, reason)
            after = ledger.read_bytes() if ledger.exists() else b""
            assert after == before, f"{name}: the site spent privacy budget"
        # an honest run still completes with what this site shares (the minimal metrics)
        out = tmp_path / "run-honest"
        exp = write_experiment(
            tmp_path / "honest.toml", **PRIVATE, **{"dp-noise": 2.0, "out-dir": str(out)}
        )
        fed.run(exp)
    finally:
        fed.stop()
    assert fed.leftovers() == []
    assert "Traceback" not in fed.log("site-hospA.log", tail=1_000_000)
    report = _report(out)
    assert report["status"] == "completed" and (out / "best.safetensors").is_file()
    (row,) = report["sites"]["hospA"]
    assert row["num-examples"] > 0 and row["eval-val-mse"] is not None
    assert row.get("val-mae") is None and row["eval-val-mae-severe"] is None  # withheld
    assert len(PrivacyLedger(ledger).entries()) == 1


def test_a_site_started_as_the_readme_shows_stops_at_its_own_ceiling(tmp_path):
    """`remdr-client start --data --site-id --superlink --root-cert --key` and nothing else:
    the run config asks for a ceiling of 1e9 over 5 rounds; the site trains while its
    cumulative epsilon stays under its default ceiling of 10 (3 rounds at sigma 1), then
    declines every round, and its ledger never passes the ceiling."""
    certs = make_deployment(tmp_path / "certs", ["127.0.0.1", "localhost"], ["hospA"])
    data = make_sites(tmp_path / "data", ["hospA"])["hospA"]
    home = tmp_path / "home"  # the site's default state folder: ~/.local/state/remdr/hospA
    fed = Loopback(tmp_path, certs=certs)
    out = tmp_path / "run"
    rounds, sigma, delta = 5, 1.0, 1e-5
    spent = [epsilon_of([(sigma, 1.0, k)], delta) for k in range(1, rounds + 1)]
    trained = sum(e <= SITE_CEILING for e in spent)
    assert 0 < trained < rounds
    exp = write_experiment(
        tmp_path / "exp.toml",
        **{**PRIVATE, "num-server-rounds": rounds, "dp-noise": sigma, "dp-epsilon-max": 1e9},
        **{"out-dir": str(out)},
    )
    try:
        fed.start_superlink()
        fed.register("hospA")
        start_site(fed, "hospA", data, env={"HOME": str(home)})
        fed.run(exp, timeout=1500)
    finally:
        fed.stop()
    assert fed.leftovers() == []
    report = _report(out)
    assert report["status"] == "completed"
    site = report["privacy"]["sample_level"]["sites"]["hospA"]
    assert site["declined_rounds"] == list(range(trained + 1, rounds + 1))
    assert site["epsilon"] == pytest.approx(spent[trained - 1], rel=1e-6)
    ledger = home / ".local" / "state" / "remdr" / "hospA" / "privacy-ledger.jsonl"
    entries = PrivacyLedger(ledger).entries()
    assert len(entries) == trained and all(e["delta"] == delta for e in entries)
    assert max(e["epsilon_cumulative"] for e in entries) <= SITE_CEILING
    for record in report["rounds"][trained:]:
        (err,) = [e for e in record.get("errors", []) if e["phase"] == "train"]
        assert f"ceiling {SITE_CEILING:g}" in err["reason"] and "\n" not in err["reason"]
    assert os.path.isdir(home / ".local" / "state" / "remdr" / "hospA")
