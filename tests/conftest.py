"""Shared fixtures: tiny synthetic datasets on disk and a CPU-sized config."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")

# Under pytest-xdist (`make test` runs one worker per core) each worker trains with its share
# of the cores: workers that each start one OpenMP thread per core spin against each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(_threads))

from remdr.config import ExperimentConfig, apply_overrides  # noqa: E402
from remdr.data.synthetic import SyntheticSpec, generate  # noqa: E402
from remdr.ops.loopback import TINY as TINY_SETTINGS  # noqa: E402

# The one tiny setting of the suite (the loopback harness and the chaos drill train the same).
TINY = {**TINY_SETTINGS, "epochs": 1}

# The same tiny setting as command-line flags, for the CLI tests.
TINY_CLI_FLAGS = [*(arg for k, v in TINY.items() for arg in ("--set", f"{k}={v}")), "--quiet"]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """48 eyes, 32 px, 6 B-scans: enough for every code path, seconds to train on."""
    out = tmp_path_factory.mktemp("tiny")
    generate(out, SyntheticSpec(n=48, size=32, depth=6, n_sites=2, seed=1))
    return out


@pytest.fixture()
def tiny_cfg() -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), TINY)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("REMDR_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@contextmanager
def flower_run_identity() -> Iterator[None]:
    """What Flower's ServerApp runtime sets before `main` runs: new messages need a run id."""
    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as mp:
        for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
            mp.setattr(TaskIdentity, attr, value)
        yield


@pytest.fixture()
def in_a_run() -> Iterator[None]:
    with flower_run_identity():
        yield


@pytest.fixture()
def one_thread() -> Iterator[None]:
    """A tiny model trains fastest on one thread, the more so on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
