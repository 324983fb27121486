"""Sites that share a machine: each site's processes keep to its share of the cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from remdr.ops.loopback import Loopback
from remdr.ops.processes import thread_env, usable_cores

POOLS = "import torch; print(torch.get_num_threads(), torch.get_num_interop_threads())"


def _python(code: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_a_clientapp_process_of_a_site_started_with_threads_keeps_to_them():
    """A SuperNode's ClientApp processes (the fallback without a worker) inherit the site's
    environment: torch's and OpenMP's pools take its thread count."""
    env = {**os.environ, **thread_env(1)}
    assert _python(POOLS, env).split()[0] == "1"
    assert _python("import os; print(os.environ['MKL_NUM_THREADS'])", env) == "1"


def test_the_site_worker_sizes_both_torch_pools():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = f"from remdr.client.worker import size_threads; size_threads(1); {POOLS}"
    assert _python(code, env) == "1 1"  # the inter-op pool ignores OMP_NUM_THREADS otherwise


def test_remdr_client_hands_its_threads_to_the_worker(tmp_path):
    """`remdr-client start --threads N` starts the worker with N threads (its log says so)."""
    import argparse

    from remdr.client.cli import start_worker

    args = argparse.Namespace(
        data=str(tmp_path), site_id="A", ledger=str(tmp_path / "ledger.jsonl"), port=9999,
        epsilon_max=None, delta=None, require_dp=False, share_metrics=None, min_bin_patients=5,
        allow_fault_drill=False,
    )  # fmt: skip
    log = tmp_path / "worker.log"
    with open(log, "w") as fh:  # the worker inherits this process's stderr: point it at a file
        saved = os.dup(2)
        os.dup2(fh.fileno(), 2)
        try:
            folder = start_worker(args, {**os.environ, **thread_env(1)}, threads=1)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    try:
        deadline = time.monotonic() + 120
        while "site worker ready" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.3)
        assert "(1 torch threads)" in log.read_text()
    finally:
        from remdr.ops.processes import kill_matching

        kill_matching([str(folder)])


def test_the_loopback_harness_divides_the_cores_between_its_sites(tmp_path):
    assert Loopback(tmp_path).threads == max(1, usable_cores() // 2)
    assert Loopback(tmp_path, sites_per_machine=8).threads == max(1, usable_cores() // 8)
    assert Loopback(tmp_path, sites_per_machine=1).threads == usable_cores()
