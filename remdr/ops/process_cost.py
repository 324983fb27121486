"""What the coordinator's processes cost while a federation runs: CPU seconds and peak memory.

A `CoordinatorMeter` marks the environment that the federation's processes inherit (a variable
with a value of its own) and samples `/proc` every `interval` seconds: every process carrying
the mark whose command line is a coordinator's (the SuperLink, its SuperExec for the ServerApp,
the ServerApp, or the simulation's `flwr-simulation`, which runs the ServerApp there) counts.
CPU is each process's user + system time as last seen (a process that exits between two samples
loses at most `interval` of it); memory is the largest sum of their resident sets at one sample.
Linux only (`/proc`); elsewhere both read 0.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

MARK = "REMDR_COST_MARK"
# the coordinator's processes, by command line; the sites' SuperExec runs ClientApps instead
COORDINATOR = ("flower-superlink", "flwr-serverapp", "flwr-simulation", "remdr-server")
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@dataclass
class CoordinatorCost:
    cpu_seconds: float = 0.0
    peak_rss_bytes: int = 0


def is_coordinator(cmdline: str) -> bool:
    if "flower-superexec" in cmdline:  # a SuperNode's SuperExec starts ClientApps
        return "clientapp" not in cmdline
    return any(name in cmdline for name in COORDINATOR)


def _read(pid: str, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


class CoordinatorMeter:
    """Use as a context manager around starting and running the federation; `environ()` is
    what its processes must inherit (the meter also sets it in this process's environment
    while it runs, so children started with a copy of `os.environ` carry it)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.value = uuid.uuid4().hex
        self.interval = interval
        self.cpu: dict[str, float] = {}  # pid -> CPU seconds as last seen
        self.peak = 0
        self._ours: dict[str, bool] = {}  # pid -> carries the mark and is a coordinator's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._saved: str | None = None

    def environ(self) -> dict[str, str]:
        return {MARK: self.value}

    def __enter__(self) -> CoordinatorMeter:
        self._saved = os.environ.get(MARK)
        os.environ[MARK] = self.value
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.sample()  # the last state before the federation is stopped
        self._stop.set()
        self._thread.join(10)
        if self._saved is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = self._saved

    @property
    def cost(self) -> CoordinatorCost:
        return CoordinatorCost(sum(self.cpu.values()), self.peak)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _is_ours(self, pid: str) -> bool:
        if pid not in self._ours:
            environ = _read(pid, "environ").split(b"\0")
            cmdline = _read(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace")
            marked = f"{MARK}={self.value}".encode() in environ
            self._ours[pid] = marked and is_coordinator(cmdline)
        return self._ours[pid]

    def sample(self) -> None:
        if not Path("/proc/self/stat").exists():
            return
        rss = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or not self._is_ours(entry):
                continue
            stat = _read(entry, "stat").decode(errors="replace")
            fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state is fields[0]
            if len(fields) < 22:
                continue
            self.cpu[entry] = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
            rss += int(fields[21]) * PAGE
        self.peak = max(self.peak, rss)
