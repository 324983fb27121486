"""Run the federation on Flower's simulation runtime and leave nothing running afterwards.

`flwr run` against a `:local:` connection starts a detached, Ray-backed SuperLink that outlives
the command; this module gives it private ports and stops it (and every helper it started) when
the run ends, fails or is interrupted. The Ray cluster is a private one, stopped with it, or one
the user runs (`SimResources.ray_address`, `remdr.sim.ray_cluster`), which is left running.
"""

from __future__ import annotations

import atexit
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remdr.sim.ray_cluster import ENV, PRIVATE, probe, resolve_address, stage_sites

from remdr.errors import Problems, RemdrError
from remdr.federation.app_bundle import write_bundle
from remdr.ops.processes import executable, flower_env, free_port, kill_matching

ROUND_LINE = re.compile(r"remdr (round|final model \(round) \d+/\d+\)?:.*")
SITE_FAILED = re.compile(r"site \S+ failed in \S+: .*")  # the strategy's warning (`_error`)
ERROR_LINE = re.compile(r"ERROR|Traceback|error in reply|Exception", re.IGNORECASE)
# the ServerApp's last act, after the run directory is complete (`remdr.server.app`): `flwr run`
# takes another ~3 s to notice the run ended and exit, and its processes ~2 s to stop
FINISHED_LINE = re.compile(r"federation finished: \d+ rounds in ")


@dataclass
class SimResources:
    """What each virtual site gets, and on which Ray cluster."""

    cpus_per_site: int = 1
    gpus_per_site: float = 0.0
    # HOST:PORT or "auto": attach to that cluster (never stopped by the run); "": $RAY_ADDRESS
    # if set, else a private cluster; "local": a private cluster whatever $RAY_ADDRESS says
    ray_address: str = ""
    # shared storage for what the sites read and write between rounds; "": in the run directory
    state_dir: str = ""


def check_site_resources(p: Problems, cpus_per_site: float, gpus_per_site: float = 0.0) -> None:
    """Flower 1.42 sends the sites' resources in a simulation config whose CPU count is an
    unsigned integer (`flwr/proto/federation_config.proto`): half a CPU fails inside `flwr run`
    with a message about Python types, so it is refused here, before any work."""
    if not (cpus_per_site >= 1 and float(cpus_per_site).is_integer()):
        p.add(
            f"--cpus-per-site {cpus_per_site:g}",
            "Flower gives each virtual site a whole number of CPUs, at least 1",
            "e.g. --cpus-per-site 1",
        )
    if not gpus_per_site >= 0:
        p.add(f"--gpus-per-site {gpus_per_site:g}", "must be 0 or more", "e.g. --gpus-per-site 0.5")


def run_federation(
    run_config: dict[str, Any],
    n_sites: int,
    resources: SimResources,
    log_path: Path,
    on_line: Callable[[str], None] | None = None,
    ports: tuple[int, int] | None = None,
) -> int:
    """Run one federated experiment with `n_sites` virtual SuperNodes; return flwr's exit code.

    The local SuperLink gets `ports` (HTTP API, Control API), free ones by default."""
    problems = Problems()
    check_site_resources(problems, resources.cpus_per_site, resources.gpus_per_site)
    problems.raise_if_any()
    http_port, control_port = ports or (free_port(), free_port())
    address = resolve_address(resources.ray_address)
    if address:
        _check_cluster(address, n_sites, resources, run_config)
    if resources.state_dir:  # the sites' data and state where every Ray node reaches them
        root = stage_sites(run_config["sim-data-root"], resources.state_dir)
        run_config = {**run_config, "sim-data-root": str(root)}
    # short: a private cluster's Unix sockets live under it (Ray's session dir, 107-byte limit)
    tmp = tempfile.mkdtemp(prefix="remdr-sim-", dir="/tmp" if Path("/tmp").is_dir() else None)
    proc = None

    def teardown() -> None:
        try:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # the SuperLink and its helpers, and the private Ray cluster (GCS, raylet, workers:
            # their command lines name tmp); an attached cluster's processes never name it
            kill_matching([f"127.0.0.1:{http_port}", f"127.0.0.1:{control_port}", tmp])
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    finished = False
    try:
        cmd, env = _flower_command(Path(tmp), run_config, n_sites, resources, address)
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                if on_line:
                    on_line(line.rstrip("\n"))
                if FINISHED_LINE.search(line):
                    finished = True
                    return 0
            return proc.wait()
    finally:
        if finished:  # the results are on disk: stopping the processes (~5 s) need not wait
            background = threading.Thread(target=teardown, name="remdr-sim-teardown")
            background.start()
            _TEARDOWNS.append(background)
        else:
            teardown()


def _flower_command(
    tmp: Path, run_config: dict[str, Any], n_sites: int, resources: SimResources, address: str
) -> tuple[list[str], dict[str, str]]:
    """`flwr run` of the app bundle against a local SuperLink whose files live under `tmp`,
    and its environment."""
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    bundle = write_bundle(tmp / "app", run_config)
    env = flower_env(home)
    # read by ray.init() in flwr-simulation, which this SuperLink starts; no CPU/GPU counts
    # go to ray.init (Ray refuses them when attaching), only the sites' client_resources
    env[ENV] = address or PRIVATE
    if not address:  # the private cluster's files under tmp: its processes name it, so
        env["RAY_TMPDIR"] = str(tmp)  # they are found and stopped, and no other cluster is
    fed_cfg = (
        f"num_supernodes={n_sites} client_resources_num_cpus={resources.cpus_per_site:g} "
        f"client_resources_num_gpus={resources.gpus_per_site:g}"
    )
    cmd = [executable("flwr"), "run", str(bundle), "local", "--stream"]
    return cmd + ["--federation-config", fed_cfg], env


def finish_teardowns() -> None:
    """Wait until every finished federation's processes are gone (`run_federation` stops them
    in the background while the simulator tests the model)."""
    while _TEARDOWNS:
        _TEARDOWNS.pop().join()


_TEARDOWNS: list[threading.Thread] = []
atexit.register(finish_teardowns)


def _check_cluster(address: str, n_sites: int, resources: SimResources, run_config: dict) -> None:
    """Refuse a cluster that cannot host one site; say where the sites will run and what every
    node must reach."""
    cluster = probe(address)
    slots = cluster.slots(resources.cpus_per_site, resources.gpus_per_site)
    per_site = f"{resources.cpus_per_site:g} CPU, {resources.gpus_per_site:g} GPU per site"
    if slots == 0:
        raise RemdrError(
            f"the Ray cluster at {address} ({cluster.describe()}) cannot host one site",
            per_site,
            "lower --cpus-per-site / --gpus-per-site, or add nodes with more of them",
        )
    where = resources.state_dir or run_config.get("sim-data-root", "")
    print(
        f"remdr-sim: Ray cluster at {address}: {cluster.describe()}; {min(slots, n_sites)} of "
        f"{n_sites} sites train at once ({per_site}); the sites read and write under {where}, "
        "which every node must reach at that path",
        file=sys.stderr,
        flush=True,
    )


def check_finished(code: int, log_path: Path) -> None:
    if code != 0:
        tail = [
            ln for ln in log_path.read_text(errors="replace").splitlines() if ERROR_LINE.search(ln)
        ][-3:]
        raise RemdrError(
            "the federated run failed",
            " | ".join(tail) or f"flwr exit code {code}",
            f"see {log_path}",
        )


def check_trained(records: list[dict], log_path: Path) -> None:
    """Refuse a federation in which no round aggregated a site's update (every site failed,
    or every update or aggregate was refused): its "model" is the initial one, and a results
    table for it would mislead."""
    if any(rec.get("aggregated") and "refused" not in rec for rec in records):
        return
    reasons = list(
        dict.fromkeys(
            f"{e.get('site')} in {e.get('phase')}: {e.get('reason')}"
            for rec in records
            for e in rec.get("errors", [])
        )
    )
    refused = [str(rec["refused"]) for rec in records if "refused" in rec]
    missing = [", ".join(m) for rec in records for m in rec.get("missing", {}).values()]
    why = (
        " | ".join(reasons[:3])
        or (f"the aggregate was refused: {refused[0]}" if refused else "")
        or (f"no reply from {missing[0]}" if missing else "no reply")
    )
    raise RemdrError("no round aggregated a site's update", why, f"see {log_path}")


def stream_printer(prefix: str = "  ") -> Callable[[str], None]:
    last = [""]  # Flower's stream can carry a log line twice (its handler and a root handler)
    told: set[str] = set()  # a site's failure, once per reason: not once per round

    def show(line: str) -> None:
        m = ROUND_LINE.search(line)
        if m:
            if m.group(0) != last[0]:
                print(prefix + m.group(0).replace("remdr ", ""), flush=True)
            last[0] = m.group(0)
        elif "ServerApp raised" in line or "error in reply" in line:
            print(prefix + line.strip(), file=sys.stderr, flush=True)
        elif (f := SITE_FAILED.search(line)) and f.group(0) not in told:
            told.add(f.group(0))
            print(prefix + f.group(0), file=sys.stderr, flush=True)

    return show
