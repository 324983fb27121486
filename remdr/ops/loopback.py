"""A real federation on loopback: SuperLink and SuperNodes started through `remdr-server` /
`remdr-client`, stopped (with every helper process) even when something fails. Used by the
end-to-end tests and by the fault drill `deploy/chaos`."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from remdr.data.synthetic import SyntheticSpec, generate
from remdr.ops.processes import (
    ProcessGroup,
    flower_env,
    free_port,
    matching_processes,
    usable_cores,
    wait_healthy,
)

BIN = Path(sys.executable).parent
# The CPU-sized model and data every drill and test trains: seconds per round on 2 cores.
TINY = {
    "image-size": 32,
    "n-bscans": 2,
    "embed-dim": 16,
    "fusion-hidden": 16,
    "batch-size": 8,
    "device": "cpu",
}
EXPERIMENT = {
    **TINY,
    "method": "concat",
    "num-server-rounds": 2,
    "local-epochs": 1,
    "min-nodes": 2,
    "round-timeout": 300.0,
}


def make_sites(root: Path, names: list[str], n: int = 32) -> dict[str, Path]:
    sites = {}
    for i, name in enumerate(names):
        sites[name] = root / f"site-{name}"
        generate(sites[name], SyntheticSpec(n=n, size=32, depth=6, n_sites=1, seed=10 + i))
    return sites


def write_experiment(path: Path, **overrides) -> Path:
    values = {**EXPERIMENT, **overrides}
    lines = [
        f"{k} = {json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else v}"
        for k, v in values.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


class Loopback:
    """A coordinator and its sites on this machine. The sites share its cores: each site's
    training gets `usable_cores() // sites_per_machine` threads (`remdr-client start
    --threads`), as separate hospitals' machines would not have to; a loopback federation has
    at least two sites, so that is the default."""

    def __init__(
        self, root: Path, *, certs: Path | None = None, sites_per_machine: int = 2
    ) -> None:
        self.root, self.certs = root, certs
        self.threads = max(1, usable_cores() // max(1, sites_per_machine))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_ports: list[int] = []
        self.group = ProcessGroup(markers=[f"127.0.0.1:{self.port}", f"{root}/"])
        self.superlink = None
        self.sites: dict[str, tuple] = {}

    def tls_args(self) -> list[str]:
        return ["--root-cert", str(self.certs / "ca.crt")] if self.certs else ["--insecure"]

    def start_superlink(self) -> None:
        sec = ["--certs", str(self.certs)] if self.certs else ["--insecure"]
        cmd = [
            str(BIN / "remdr-server"),
            "start",
            "--out",
            str(self.root / "coord"),
            "--port",
            str(self.port),
            *sec,
        ]
        self.superlink = self.group.start(cmd, self.root / "superlink.log")
        ca = str(self.certs / "ca.crt") if self.certs else None
        if not wait_healthy(self.address, ca_cert=ca, timeout=60):
            raise RuntimeError("SuperLink did not become healthy:\n" + self.log("superlink.log"))

    def stop_superlink(self) -> None:
        self.group.stop_one(self.superlink)
        from remdr.ops.processes import kill_matching

        # the SuperLink's helpers (SuperExec, ServerApp) die with it; the sites stay up
        kill_matching(
            [f"127.0.0.1:{self.port}"],
            unless=("flower-supernode", "flwr-clientapp", "remdr-client"),
        )

    def register(self, site: str) -> None:
        cmd = [
            str(BIN / "remdr-server"),
            "register",
            str(self.certs / "keys" / f"{site}.pub"),
            "--federation",
            self.address,
            *self.tls_args(),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=flower_env())
        if res.returncode != 0:
            raise RuntimeError(f"registering {site} failed:\n{res.stdout}{res.stderr}")

    def start_site(self, name: str, data: Path, env: dict[str, str] | None = None, key: str = ""):
        """Start a SuperNode for `name` (authenticating with `key`, default its own); returns
        (process, port)."""
        port = free_port()
        self.node_ports.append(port)
        self.group.markers.append(f"127.0.0.1:{port}")
        auth = ["--key", key or str(self.certs / "keys" / name)] if self.certs else []
        cmd = [
            str(BIN / "remdr-client"), "start", "--data", str(data), "--site-id", name,
            "--superlink", self.address, "--port", str(port), *self.tls_args(), *auth,
            "--ledger", str(self.root / f"ledger-{name}.jsonl"), "--threads", str(self.threads),
        ]  # fmt: skip
        proc = self.group.start(
            cmd, self.root / f"site-{name}.log", {**flower_env(), **(env or {})}
        )
        self.sites[name] = (proc, port)
        return proc, port

    def kill_site(self, name: str) -> None:
        """The hospital's machine dies: SIGKILL the SuperNode and its ClientApp, no goodbye."""
        import os
        import signal

        from remdr.ops.processes import kill_matching

        proc, port = self.sites.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        kill_matching([f"127.0.0.1:{port}"])

    def run(
        self,
        experiment: Path,
        timeout: float = 900,
        background: bool = False,
        fault_drill: bool = False,
    ):
        """Submit `experiment` with `remdr-server run`; with `fault_drill` the sites run the
        fault-drill ClientApp (a site started with REMDR_FAULT_UPDATE sends bad updates)."""
        cmd = [
            str(BIN / "remdr-server"),
            "run",
            "--federation",
            self.address,
            "--config",
            str(experiment),
            *self.tls_args(),
            *(["--fault-drill"] if fault_drill else []),
        ]
        if background:
            return self.group.start(cmd, self.root / "run.log")
        with open(self.root / "run.log", "ab") as fh:
            return subprocess.run(
                cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=flower_env()
            ).returncode

    def log(self, name: str, tail: int = 4000) -> str:
        path = self.root / name
        return path.read_text(errors="replace")[-tail:] if path.exists() else f"(no {name})"

    def stop(self) -> None:
        self.group.stop()

    def leftovers(self) -> list[str]:
        return list(matching_processes(self.group.markers).values())
