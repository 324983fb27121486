"""remdr-sim on an existing Ray cluster: the address, its checks, the sites' shared state, the
placement record (fast tier; the cluster itself runs in tests/test_ray_cluster_e2e.py)."""

from __future__ import annotations

import os
import time

import pytest
from flwr.app import Context, RecordDict
from remdr.client import site_handlers
from remdr.sim import cli as sim_cli
from remdr.sim.ray_cluster import (
    Cluster,
    RayNode,
    address_problem,
    probe,
    resolve_address,
    stage_sites,
)

from remdr.errors import RemdrError
from remdr.ops.processes import free_port


@pytest.mark.parametrize("address", ["", "auto", "local", "10.0.0.5:6379", "head.example.org:6379"])
def test_cluster_addresses_ray_understands_are_accepted(address):
    assert address_problem(address) is None


@pytest.mark.parametrize(
    "address, why",
    [("ray://head:10001", "Ray Client"), ("head", "HOST:PORT"), ("head:0", "HOST:PORT"),
     (":6379", "HOST:PORT"), ("head:port", "HOST:PORT")],
)  # fmt: skip
def test_other_addresses_are_refused_with_the_reason(address, why):
    assert why in address_problem(address)


def test_the_flag_wins_over_the_environment_and_local_means_a_private_cluster():
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert resolve_address("", env) == "10.0.0.5:6379"
    assert resolve_address("auto", env) == "auto"
    assert resolve_address("local", env) == ""
    assert resolve_address("", {}) == ""


@pytest.mark.parametrize(
    "flags, env, names",
    [(["--ray-address", "ray://head:10001"], "", "--ray-address ray://head:10001"),
     ([], "head-without-port", "$RAY_ADDRESS head-without-port")],
)  # fmt: skip
def test_a_bad_cluster_address_is_one_line_before_any_work(
    tmp_path, capsys, monkeypatch, flags, env, names
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if env:
        monkeypatch.setenv("RAY_ADDRESS", env)
    out = tmp_path / "never"
    assert sim_cli.main(["--out", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0] and "ray start --head" in err[0]
    assert not out.exists()


def test_a_state_dir_that_is_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "f").write_text("")
    assert sim_cli.main(["--out", str(tmp_path / "o"), "--state-dir", str(tmp_path / "f")]) == 2
    assert "--state-dir" in capsys.readouterr().err


def test_nothing_listening_at_the_address_is_said_at_once():
    start = time.monotonic()
    with pytest.raises(RemdrError, match="nothing answers at 127.0.0.1"):
        probe(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - start < 15  # Ray alone would wait minutes


def test_sites_at_once_are_counted_per_node_as_flower_sizes_its_pool():
    cluster = Cluster("h:1", [RayNode("a", "h", 3, 0), RayNode("b", "h", 4, 1)])
    assert cluster.slots(3, 0) == 2  # one on each node, never "7 CPUs hold two 3-CPU sites + 1"
    assert cluster.slots(1, 0) == 7
    assert cluster.slots(1, 0.5) == 2  # only node b has a GPU: two halves
    assert cluster.slots(8, 0) == 0


def _sites(root):
    for k in range(2):
        (root / f"site-{k}").mkdir(parents=True)
        (root / f"site-{k}" / "eye.npz").write_bytes(b"x" * (k + 1))
    (root / "ledgers").mkdir()  # a private run's state: never copied as data
    (root / "ledgers" / "site-0.jsonl").write_text("{}")
    return root


def test_staging_copies_the_sites_data_and_keeps_their_state_while_the_study_lasts(tmp_path):
    root = _sites(tmp_path / "runs" / "sim" / "data" / "sites")
    dest = stage_sites(root, tmp_path / "shared")
    assert dest.parent == (tmp_path / "shared").resolve() and dest.name.startswith("sim-sites-")
    assert (dest / "site-1" / "eye.npz").read_bytes() == b"xx"
    assert not (dest / "ledgers").exists()
    (dest / "ledgers").mkdir()  # a site's ledger and state, written during the study
    (dest / "ledgers" / "site-0.jsonl").write_text("spent")
    assert stage_sites(root, tmp_path / "shared") == dest  # the study's next federation
    assert (dest / "ledgers" / "site-0.jsonl").read_text() == "spent"


def test_a_new_study_in_the_same_run_directory_starts_with_fresh_site_state(tmp_path):
    import shutil

    root = _sites(tmp_path / "sim" / "data" / "sites")
    dest = stage_sites(root, tmp_path / "shared")
    (dest / "ledgers").mkdir()
    shutil.rmtree(root)  # remdr-sim replaces --out
    _sites(root)
    os.utime(root, ns=(1, 1))  # whatever the clock: the folder is not the one staged
    assert stage_sites(root, tmp_path / "shared") == dest
    assert not (dest / "ledgers").exists() and (dest / "site-0" / "eye.npz").is_file()


def test_only_a_simulated_site_in_a_ray_worker_names_its_ray_node():
    ctx = Context(
        run_id=1, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={}
    )
    deployed = Context(
        run_id=1, node_id=2, node_config={"site-id": "A"}, state=RecordDict(), run_config={}
    )
    assert site_handlers._placement(deployed) == {}
    assert site_handlers._placement(ctx) == {}  # no Ray in this process
