"""The site's privacy history: an append-only JSON-lines file, one entry per private release.

Flower's Opacus example builds a new accountant every round, so its epsilon covers one round;
here every release made from the site's data (completed or aborted, in any run) is appended and
fsynced when its training ends, so the budget survives restarts. A corrupt line is an error,
never skipped: the spent budget could not be known.

The ceiling check and the append are one critical section: a private training `hold`s the
ledger (an exclusive `fcntl.flock` on `<ledger>.lock` beside it) from its plan to its entry, so
two trainings at one site cannot both plan against the same history and both spend the last of
the budget; a second one declines at once. The kernel drops the lock when its process dies, so
a crash never blocks the site. A crashed training leaves no entry, and it needs none: weights are
written or sent only after the entry is appended, so nothing it computed left the process.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from remdr.errors import PrivacyError
from remdr.privacy.accounting import History, Release, epsilon_of, release_of


class LedgerHold:
    """One training's exclusive hold on a ledger (an open, flock-ed lock file); `release` ends it."""

    def __init__(self, fh) -> None:
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None and not self._fh.closed:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
        self._fh = None


class PrivacyLedger:
    """Append-only JSON-lines file of every private release made from one site's data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def hold(self) -> LedgerHold:
        """Hold the ledger for one training, from its ceiling check to its entry, or decline at
        once (PrivacyError) if another training at this site holds it. The lock file is never
        deleted (deleting it would let two processes lock two different files)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.lock_path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = " ".join(fh.read().split()) or "another process"
            fh.close()
            raise PrivacyError(
                "privacy budget: training declined",
                f"another private training at this site holds the ledger {self.path} ({holder}); "
                "two at once could both spend the last of the budget",
                "wait until it has finished, then retry",
            ) from None
        fh.seek(0)
        fh.truncate()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fh.write(f"pid {os.getpid()} since {stamp}\n")
        fh.flush()
        return LedgerHold(fh)

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                release_of(entry)
            except (ValueError, KeyError, TypeError):
                raise PrivacyError(
                    f"privacy ledger {self.path} line {n} is corrupt",
                    "the spent budget cannot be known",
                    "restore the ledger from backup; never delete it to reset the budget",
                ) from None
            out.append(entry)
        return out

    def history(self) -> History:
        return [release_of(e) for e in self.entries()]

    def epsilon(self, delta: float, extra: Iterable[Release] = ()) -> float:
        return epsilon_of(self.history() + list(extra), delta)

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
