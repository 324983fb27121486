"""A real federation on loopback for tests: SuperLink and SuperNodes started through
`remdr-server` / `remdr-client`, stopped (with every helper process) even when a test fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from remdr.data.synthetic import SyntheticSpec, generate
from remdr.processes import ProcessGroup, flower_env, free_port, matching_processes, wait_healthy

BIN = Path(sys.executable).parent
EXPERIMENT = {
    "method": "concat",
    "num-server-rounds": 2,
    "local-epochs": 1,
    "image-size": 32,
    "n-bscans": 2,
    "embed-dim": 16,
    "fusion-hidden": 16,
    "batch-size": 8,
    "device": "cpu",
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
    def __init__(self, root: Path, *, certs: Path | None = None) -> None:
        self.root, self.certs = root, certs
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_ports: list[int] = []
        self.group = ProcessGroup(markers=[f"127.0.0.1:{self.port}", f"{root}/"])
        self.superlink = None

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
        assert wait_healthy(self.address, ca_cert=ca, timeout=60), self.log("superlink.log")

    def stop_superlink(self) -> None:
        self.group.stop_one(self.superlink)
        from remdr.processes import kill_matching

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
        assert res.returncode == 0, res.stdout + res.stderr

    def start_site(self, name: str, data: Path) -> None:
        port = free_port()
        self.node_ports.append(port)
        self.group.markers.append(f"127.0.0.1:{port}")
        auth = ["--key", str(self.certs / "keys" / name)] if self.certs else []
        cmd = [
            str(BIN / "remdr-client"), "start", "--data", str(data), "--site-id", name,
            "--superlink", self.address, "--port", str(port), *self.tls_args(), *auth,
        ]  # fmt: skip
        self.group.start(cmd, self.root / f"site-{name}.log")

    def run(self, experiment: Path, timeout: float = 900, background: bool = False):
        cmd = [
            str(BIN / "remdr-server"),
            "run",
            "--federation",
            self.address,
            "--config",
            str(experiment),
            *self.tls_args(),
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


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)
