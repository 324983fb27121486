"""Starting and addressing the Flower processes: safe environment, health checks, FLWR_HOME.

No Flower imports: the wrappers exec Flower's public commands (`flower-superlink`,
`flower-supernode`, `flwr`), whose flags are part of its documented interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from remdr.errors import ConfigError

SAFE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # sites run the remdr they installed
}


def flower_env(flwr_home: str | Path | None = None) -> dict[str, str]:
    """Telemetry and update checks off; this environment's bin first on PATH, because Flower
    starts its helpers (`flower-superexec`, `flwr-clientapp`) by name."""
    env = {**os.environ, **SAFE_ENV}
    # Flower's SuperExec looks for a new message to run every 1 s by default; 0.1 s saves most
    # of a second per message for a few ms of CPU (a supported setting; yours wins if set)
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or `taskset`'s share),
    not every core of the machine."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # no affinity on this platform
        return max(1, os.cpu_count() or 1)


def thread_env(threads: int) -> dict[str, str]:
    """The variables that size torch's OpenMP/MKL thread pool in a site's worker and in every
    ClientApp process its SuperNode starts: sites sharing a machine would otherwise each start
    one thread per core and spin against each other."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def executable(name: str) -> str:
    """A Flower command from the same environment as this Python, else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise ConfigError(
            f"'{name}' not found", "flwr is not installed in this environment", "pip install remdr"
        )
    return found


def health_url(address: str, tls: bool) -> str:
    return f"{'https' if tls else 'http'}://{address}/health"


def wait_healthy(address: str, *, ca_cert: str | None = None, timeout: float = 30.0) -> bool:
    """Poll the SuperLink's /health until it answers 200 or `timeout` passes."""
    ctx = ssl.create_default_context(cafile=ca_cert) if ca_cert else None
    url = health_url(address, tls=ca_cert is not None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:  # noqa: S310 (local URL)
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError, OSError):
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)


def write_flwr_home(home: Path, address: str, *, insecure: bool, root_cert: str | None) -> str:
    """An isolated FLWR_HOME whose config.toml names one SuperLink connection, `remdr`."""
    home.mkdir(parents=True, exist_ok=True)
    if insecure:
        security = "insecure = true"
    else:
        if not root_cert or not Path(root_cert).is_file():
            raise ConfigError(
                "no CA certificate for the SuperLink",
                f"{root_cert or '--root-cert'} not found",
                "pass --root-cert ca.crt (from deploy/), or --insecure on a trusted loopback",
            )
        security = f'root-certificates = "{Path(root_cert).resolve()}"'
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "remdr"\n\n[superlink.remdr]\naddress = "{address}"\n{security}\n'
    )
    return "remdr"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def matching_processes(markers: list[str], *, unless: tuple[str, ...] = ()) -> dict[int, str]:
    """pid -> command line of every other process whose command line names one of `markers`."""
    found = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        pid = int(entry.name)
        if (
            pid != os.getpid()
            and any(m in cmd for m in markers)
            and not any(u in cmd for u in unless)
        ):
            found[pid] = cmd
    return found


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc/<pid>/stat."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state letter
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def with_descendants(pids: list[int]) -> list[int]:
    tree, out, todo = _children(), [], list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.append(pid)
            todo.extend(tree.get(pid, []))
    return out


def kill_matching(
    markers: list[str], sig_timeout: float = 5.0, *, unless: tuple[str, ...] = ()
) -> int:
    """End every process of this user whose command line contains one of `markers`, and all
    their descendants (Linux).

    Flower starts detached helpers (`flower-superexec`, `flwr-clientapp`, a Ray cluster) in their
    own sessions, so killing the parent's process group does not reach them; their command lines
    name the ports they serve, which is what the markers match, and Ray's agents and workers are
    children of its raylet. Command lines containing any of `unless` are spared.
    """
    import signal

    def alive(pids: list[int]) -> list[int]:
        return [p for p in pids if Path(f"/proc/{p}").exists()]

    pids = [
        p
        for p in with_descendants(list(matching_processes(markers, unless=unless)))
        if p != os.getpid()
    ]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + sig_timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive(pids):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


class ProcessGroup:
    """The processes one job started; `stop()` ends them and every helper they spawned."""

    def __init__(self, markers: list[str] | None = None) -> None:
        import subprocess

        self._subprocess = subprocess
        self.procs: list = []
        self.markers = list(markers or [])

    def start(self, cmd: list[str], log: Path, env: dict[str, str] | None = None):
        fh = open(log, "ab")  # noqa: SIM115 (closed when the process is stopped)
        proc = self._subprocess.Popen(
            cmd, stdout=fh, stderr=self._subprocess.STDOUT, env=env, start_new_session=True
        )
        proc._remdr_log = fh  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def stop_one(self, proc, timeout: float = 10.0) -> None:
        import signal

        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except self._subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)
        proc._remdr_log.close()

    def stop(self) -> None:
        for proc in reversed(self.procs):
            self.stop_one(proc)
        if self.markers:
            kill_matching(self.markers)
        self.procs.clear()
