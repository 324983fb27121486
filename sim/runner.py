"""Run the federation on Flower's simulation runtime and leave nothing running afterwards.

`flwr run` against a `:local:` connection starts a detached, Ray-backed SuperLink that outlives
the command; this module gives it private ports and stops it (and every helper it started) when
the run ends, fails or is interrupted.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remdr.errors import RemdrError
from remdr.federation.app_bundle import write_bundle
from remdr.ops.processes import executable, flower_env, free_port, kill_matching

ROUND_LINE = re.compile(r"remdr (round|final model \(round) \d+/\d+\)?:.*")
ERROR_LINE = re.compile(r"ERROR|Traceback|error in reply|Exception", re.IGNORECASE)


@dataclass
class SimResources:
    cpus_per_site: float = 1.0
    gpus_per_site: float = 0.0


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
    http_port, control_port = ports or (free_port(), free_port())
    ray_before = _ray_sessions()
    with tempfile.TemporaryDirectory(prefix="remdr-sim-") as tmp:
        home = Path(tmp) / "flwr-home"
        home.mkdir()
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
        )
        bundle = write_bundle(Path(tmp) / "app", run_config)
        env = flower_env(home)
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
        env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
        fed_cfg = (
            f"num_supernodes={n_sites} client_resources_num_cpus={resources.cpus_per_site:g} "
            f"client_resources_num_gpus={resources.gpus_per_site:g}"
        )
        cmd = [
            executable("flwr"),
            "run",
            str(bundle),
            "local",
            "--stream",
            "--federation-config",
            fed_cfg,
        ]
        proc = None
        try:
            with open(log_path, "w") as log:
                proc = subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True
                )
                assert proc.stdout is not None
                for line in proc.stdout:
                    log.write(line)
                    if on_line:
                        on_line(line.rstrip("\n"))
                return proc.wait()
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)
            kill_matching([f"127.0.0.1:{http_port}", f"127.0.0.1:{control_port}", str(home)])
            # the Ray cluster the simulation started (GCS, raylet, workers) goes with it
            new_sessions = [str(p) for p in _ray_sessions() - ray_before]
            if new_sessions:
                kill_matching(new_sessions)


def _ray_sessions() -> set[Path]:
    root = Path(tempfile.gettempdir()) / "ray"
    return {p.resolve() for p in root.glob("session_2*")} if root.is_dir() else set()


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


def stream_printer(prefix: str = "  ") -> Callable[[str], None]:
    last = [""]  # Flower's stream can carry a log line twice (its handler and a root handler)

    def show(line: str) -> None:
        m = ROUND_LINE.search(line)
        if m:
            if m.group(0) != last[0]:
                print(prefix + m.group(0).replace("remdr ", ""), flush=True)
            last[0] = m.group(0)
        elif "ServerApp raised" in line or "error in reply" in line:
            print(prefix + line.strip(), file=sys.stderr, flush=True)

    return show
