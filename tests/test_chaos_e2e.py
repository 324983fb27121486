"""The fault drill itself: random kills and restarts on a loopback federation, then the checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from remdr.ops.processes import flower_env

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
CHAOS = Path(__file__).parents[1] / "deploy" / "chaos"


def test_chaos_drill_passes(tmp_path):
    out = tmp_path / "chaos"
    args = [
        sys.executable, str(CHAOS), "--sites", "3", "--rounds", "3", "--kills", "2",
        "--every", "40", "--down", "15", "--bad-site", "--seed", "2",
        "--round-timeout", "150", "--out", str(out),
    ]  # fmt: skip
    res = subprocess.run(args, capture_output=True, text=True, timeout=1500, env=flower_env())
    log = (out / "chaos.log").read_text() if (out / "chaos.log").exists() else res.stdout
    assert res.returncode == 0, log + res.stderr[-3000:]
    assert "PASS" in log and log.count("killed") == 2
