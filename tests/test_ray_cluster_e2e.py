"""remdr-sim attached to a real two-node Ray cluster on loopback (slow tier).

The test starts the cluster itself, as a user would (`ray start --head`, then `ray start
--address` for a second node with its own ports and temp dir, each node offering one CPU), runs
a 2-site simulation on it and a private-cluster run of the same study, and stops only the
processes it started. One CPU per node and per site puts each site's training on its own node.

Which actor serves which site is Ray's and Flower's choice; Flower hands a round's messages to
its idle actors last-finished-first, so with a small site (it finishes first) the sites swap
nodes in the first round whose order is decided by training, not by the first round's imports.
Three rounds make that swap certain (two would only make it likely), so the test sees a site's
state (its AdamW moments, `keep-site-optimizer`) written on one node and read on the other.
What loopback cannot show: nodes with separate disks, Python installs or firewalls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from remdr.sim import cli as sim_cli
from remdr.sim.ray_cluster import probe
from safetensors.torch import load_file

from remdr.data.synthetic import SyntheticSpec, generate
from remdr.ops.processes import free_port, kill_matching, matching_processes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROUNDS = 3
RAY = str(Path(sys.executable).parent / "ray")


class LoopbackCluster:
    """Two Ray nodes on this machine, each in its own temp dir under one short root (Ray's
    Unix sockets live there); every process they start names that root or descends from one
    that does, so `stop` ends exactly those."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="remdr-ray-", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)

    def _node(self, name: str, first: list[str]) -> None:
        ports = {
            "--node-manager-port": free_port(),
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--metrics-export-port": free_port(),
            "--runtime-env-agent-port": free_port(),
        }
        cmd = [
            RAY, "start", *first, "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
            f"--temp-dir={self.root / name}", "--object-store-memory=100000000",
            "--disable-usage-stats", "--min-worker-port=0", "--max-worker-port=0",  # OS-chosen
            *(f"{flag}={port}" for flag, port in ports.items()),
        ]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=self.env)
        assert res.returncode == 0, (
            f"ray start ({name}) failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )

    def start(self) -> None:
        head = ["--head", f"--port={self.port}", "--include-dashboard=false",
                f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]  # fmt: skip
        self._node("head", head)
        self._node("second", [f"--address={self.address}"])

    def processes(self) -> dict[int, str]:
        return matching_processes([str(self.root)])

    def stop(self) -> None:
        """SIGTERM then SIGKILL to this cluster's processes and their descendants only (never
        `ray stop`, which ends every Ray process on the machine)."""
        kill_matching([str(self.root)])
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture()
def cluster():
    c = LoopbackCluster()
    try:
        c.start()
        yield c
    finally:  # also when starting or the test failed
        c.stop()


@pytest.fixture(scope="module")
def study_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raydata")
    generate(out, SyntheticSpec(n=200, size=32, depth=6, n_sites=1, seed=5))
    return out


def _simulate(data: Path, out: Path, *extra: str) -> dict:
    args = [
        "--data", str(data), "--out", str(out), "--sites", "2", "--rounds", str(ROUNDS),
        "--partition", "quantity", "--local-epochs", "2", "--image-size", "32", "--n-bscans", "2",
        "--device", "cpu", "--set", "embed-dim=16", "--set", "fusion-hidden=16",
        "--set", "optimizer=adamw", "--quiet", *extra,
    ]  # fmt: skip
    assert sim_cli.main(args) == 0
    return json.loads((out / "report.json").read_text())


def _shape(value):
    """A report's structure: its keys all the way down, leaves by type."""
    if isinstance(value, dict):  # Flower's node ids (random) key some records: one "id" key
        return {
            ("id" if k.isdigit() else k): _shape(v)
            for k, v in value.items()
            if k not in _RUN_SPECIFIC
        }
    if isinstance(value, list):
        return [_shape(v) for v in value[:1]]
    return (
        "number"
        if isinstance(value, int | float) and not isinstance(value, bool)
        else type(value).__name__
    )


# values that name this run (paths, ports, timings' lists), not its structure
_RUN_SPECIFIC = {"local_superlink_ports", "out-dir", "sim-data-root", "report_md"}


def test_a_simulation_runs_on_an_existing_two_node_cluster_and_leaves_it_running(
    cluster, study_data, tmp_path, monkeypatch
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    nodes = {int(n.node_id[:8], 16) for n in probe(cluster.address).nodes}
    assert len(nodes) == 2, "the loopback cluster did not form"
    state = tmp_path / "shared-state"

    attached = _simulate(
        study_data,
        tmp_path / "attached",
        "--ray-address",
        cluster.address,
        "--state-dir",
        str(state),
    )

    rounds = attached["federation"]["rounds"]
    placed = {
        (r["round"], site): m["sim-ray-node"][0] for r in rounds for site, m in r["sites"].items()
    }
    assert set(placed.values()) == nodes, f"both nodes serve sites: {placed}"
    sites = sorted({site for _, site in placed})
    assert sites == ["site-0", "site-1"]
    moved = [
        (site, r)
        for site in sites
        for r in range(2, ROUNDS + 1)
        if placed[r, site] != placed[r - 1, site]
    ]
    assert moved, f"no site changed nodes between rounds: {placed}"
    # a site's AdamW moments carry over every round, whichever node served it: the step count
    # its state holds after round r is its steps of rounds 1..r
    steps = {(r["round"], s): m["train-steps"] for r in rounds for s, m in r["sites"].items()}
    (staged,) = state.iterdir()
    for site in sites:
        (run_state,) = (staged / "ledgers" / f"{site}-site-state").iterdir()
        for r in (ROUNDS - 1, ROUNDS):  # the site keeps its last two rounds
            saved = load_file(str(run_state / f"round-{r:06d}.safetensors"))
            counters = {float(v) for k, v in saved.items() if k.endswith("/step")}
            assert counters == {float(sum(steps[q, site] for q in range(1, r + 1)))}, (site, r)
    # the run left the cluster as it found it: both nodes up, their processes running
    assert len(probe(cluster.address).nodes) == 2
    assert cluster.processes()

    local = _simulate(study_data, tmp_path / "local", "--ray-address", "local")
    assert _shape(attached) == _shape(local)
    for r_att, r_loc in zip(rounds, local["federation"]["rounds"], strict=True):
        assert set(r_att["sites"]) == set(r_loc["sites"])
        for site in r_att["sites"]:
            assert set(r_att["sites"][site]) == set(r_loc["sites"][site])
    # the cluster changes where the sites train, not what they compute (seeded, CPU)
    fed_att, fed_loc = (
        attached["results"]["federated"]["test"],
        local["results"]["federated"]["test"],
    )
    assert fed_att["mse"] == pytest.approx(fed_loc["mse"], rel=1e-3)

    cluster.stop()
    assert cluster.processes() == {}
