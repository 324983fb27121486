"""The site's privacy history: an append-only JSON-lines file, one entry per private release.

Flower's Opacus example builds a new accountant every round, so its epsilon covers one round;
here every release made from the site's data (completed or aborted, in any run) is appended and
fsynced when its training ends, so the budget survives restarts. A corrupt line is an error,
never skipped: the spent budget could not be known.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from remdr.errors import PrivacyError
from remdr.privacy.accounting import History, Release, epsilon_of, release_of


class PrivacyLedger:
    """Append-only JSON-lines file of every private release made from one site's data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

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
