"""Which Ray cluster a simulation runs on: a private one, or one the user already runs.

Flower 1.42 has no setting for a Ray address: its simulation runtime calls `ray.init()` with no
address in the `flwr-simulation` process of the local SuperLink that `flwr run` starts, and Ray
finds the cluster itself, from `RAY_ADDRESS` or else the cluster `ray start` last left on this
machine. So the address travels in that SuperLink's environment: the cluster `--ray-address`
names (else the user's own `RAY_ADDRESS`), or `local`, which makes Ray start a private cluster
even while a `ray start` cluster runs here (it would otherwise be attached without being asked).

Attaching has rules Flower leaves to the user. Ray refuses CPU/GPU counts in `ray.init` (each
node declared its own at `ray start`), so only the per-site resources are passed. Flower sizes
its pool of actors once, from the nodes alive when the run starts (`probe` says how many sites
train at once). Any actor on any node may serve any virtual site in any round, so everything a
site reads or writes between rounds must be where every node reaches it (`stage_sites`). And a
cluster the run did not start is never stopped by it (the runner stops only what it started).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from remdr.errors import Problems, RemdrError

PRIVATE = "local"  # Ray's own word for "start a new local cluster"
ENV = "RAY_ADDRESS"
FIX = "start one with `ray start --head`, or give --ray-address HOST:PORT (its GCS port, 6379)"


def add_cluster_flags(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--ray-address",
        default="",
        help="run the virtual sites on a Ray cluster you already run: HOST:PORT of its head "
        "(GCS port, 6379 by default) or 'auto' (the cluster `ray start` left on this machine); "
        f"default ${ENV} if set, else a private cluster ('{PRIVATE}') stopped when the run ends; "
        "an attached cluster is never stopped; run remdr-sim on a node of the cluster",
    )
    ap.add_argument(
        "--state-dir",
        default="",
        help="shared storage, mounted at the same path on every Ray node, for what the virtual "
        "sites read and write between rounds (their data, privacy ledgers, FedBN layers, "
        "optimizer moments, control variates, decoded-image cache); default: inside --out, "
        "which must then be shared",
    )


def address_problem(address: str) -> str | None:
    """Why `address` cannot name a Ray cluster for Flower's simulation; None if it can."""
    if address in ("", "auto", PRIVATE):
        return None
    if address.startswith("ray://"):
        return "Ray Client addresses are not supported (Flower's driver must run on a node)"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        return "expected HOST:PORT, 'auto' or 'local'"
    return None


def check_cluster_flags(p: Problems, args: argparse.Namespace) -> None:
    """--ray-address (and $RAY_ADDRESS when the flag is not given) and --state-dir."""
    flag = "--ray-address" if args.ray_address else f"${ENV}"
    address = args.ray_address or os.environ.get(ENV, "")
    why = address_problem(address)
    if why:
        p.add(f"{flag} {address}", why, FIX)
    if args.state_dir and Path(args.state_dir).expanduser().is_file():
        p.add(f"--state-dir {args.state_dir}", "is a file", "name a folder on shared storage")


def resolve_address(flag: str, environ: dict[str, str] | os._Environ | None = None) -> str:
    """The cluster to attach: the flag's, else $RAY_ADDRESS; "" for a private cluster."""
    environ = os.environ if environ is None else environ
    address = flag or environ.get(ENV, "")
    return "" if address == PRIVATE else address


@dataclass
class RayNode:
    node_id: str  # Ray's hex node id
    host: str
    cpus: float
    gpus: float


@dataclass
class Cluster:
    address: str
    nodes: list[RayNode]

    def slots(self, cpus_per_site: float, gpus_per_site: float) -> int:
        """How many sites train at once: Flower's actor pool, sized per node as Flower does
        (`simulation/ray_transport/ray_actor.py`, `pool_size_from_resources`)."""
        total = 0
        for node in self.nodes:
            n = math.floor(node.cpus / cpus_per_site)
            if gpus_per_site > 0:
                n = min(n, math.floor(node.gpus / gpus_per_site))
            total += n
        return total

    def describe(self) -> str:
        cpus = sum(n.cpus for n in self.nodes)
        gpus = sum(n.gpus for n in self.nodes)
        return f"{len(self.nodes)} node(s), {cpus:g} CPUs, {gpus:g} GPUs"


# Run in a child process, so this one never becomes a Ray driver (nor inherits Ray's state)
PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
alive = [n for n in ray.nodes() if n["Alive"] and n["Resources"]]
print(json.dumps([[n["NodeID"], n["NodeManagerAddress"], n["Resources"].get("CPU", 0),
                   n["Resources"].get("GPU", 0)] for n in alive]))
ray.shutdown()
"""


def probe(address: str, timeout: float = 120.0) -> Cluster:
    """The live nodes of the cluster at `address`, or a one-line RemdrError."""
    if address != "auto":  # Ray itself waits minutes for a GCS that is not there
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as err:
            why = f"nothing answers at {host}:{port} ({err.strerror or type(err).__name__})"
            raise RemdrError(f"no Ray cluster at {address}", why, FIX) from None
    env = {**os.environ, ENV: address, "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", PROBE, address],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RemdrError(
            f"no answer from a Ray cluster at {address}", f"{timeout:g} s", FIX
        ) from None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        last = [ln for ln in out.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise RemdrError(f"no Ray cluster at {address}", last[0].strip()[:200], FIX)
    nodes = [RayNode(str(i), str(h), float(c), float(g)) for i, h, c, g in json.loads(lines[-1])]
    return Cluster(address, nodes)


def stage_sites(root: str | Path, state_dir: str | Path) -> Path:
    """The virtual sites' folder under `state_dir`, where every Ray node reaches it: their data
    folders copied from `root` (hard links where the file system allows), and where their
    ledgers, cross-round state and decoded-image cache get written.

    Keyed by `root`'s path, so the federations of one study (the reference, the complete sites)
    share it as they share `root`; made anew when `root` was (a new study in the same --out
    replaces its run directory, and so its sites' state)."""
    root = Path(root).resolve()
    st = root.stat()
    source = {"root": str(root), "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:10]
    dest = (
        Path(state_dir).expanduser().resolve() / f"{root.parent.parent.name}-{root.name}-{digest}"
    )
    marker = dest / "staged-from.json"
    if marker.is_file() and json.loads(marker.read_text()) == source:
        return dest
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for entry in sorted(root.iterdir()):
        if entry.is_dir() and entry.name not in ("ledgers", "cache"):  # data, not a run's state
            shutil.copytree(entry, dest / entry.name, symlinks=False, copy_function=_link_or_copy)
    marker.write_text(json.dumps(source))  # last: a half-staged folder is staged again
    return dest


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
