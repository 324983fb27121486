"""The site worker: the ClientApp hands messages to a long-lived process that keeps torch and the
site's data loaded, over a private socket; without it the ClientApp does the work itself."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from remdr.client.worker_link import AUTHKEY, NODE_CONFIG, SOCKET
from site_app import app

from remdr.federation.run_config import run_config_defaults, split_run_config
from remdr.methods import build_model

RUN_CONFIG = {**run_config_defaults(), **TINY, "local-epochs": 1, "num-server-rounds": 2}


def _message(kind: str, arrays: dict, server_round: int) -> Message:
    meta = Metadata(
        run_id=1, message_id=f"m{server_round}", src_node_id=0, dst_node_id=7,
        reply_to_message_id="", group_id=str(server_round), created_at=time.time(), ttl=3600.0,
        message_type=kind,
    )  # fmt: skip
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content=content, metadata=meta)


def _context(data: Path, worker: Path | None) -> Context:
    node = {"data-path": str(data), "site-id": "hospA"}
    if worker is not None:
        node["worker"] = str(worker)
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=RUN_CONFIG)


def _initial() -> dict[str, torch.Tensor]:
    cfg, _ = split_run_config(RUN_CONFIG)
    torch.manual_seed(0)
    return build_model(cfg).state_dict()


def start_worker(folder: Path, node: dict | None = None, *flags: str) -> subprocess.Popen:
    """`python -m remdr.client.worker` in a fresh private folder with its key (and the site's
    node config, if given), once its socket is up."""
    folder.mkdir(mode=0o700, parents=True)
    (folder / AUTHKEY).write_bytes(secrets.token_bytes(32))
    if node is not None:
        (folder / NODE_CONFIG).write_text(json.dumps(node))
    proc = subprocess.Popen(
        [sys.executable, "-m", "remdr.client.worker", "--folder", str(folder),
         "--parent", str(os.getpid()), *flags],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (folder / SOCKET).exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)
    return proc


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """A real worker process, as `remdr-client start` starts it (its parent: this test run),
    shared by the tests of this module: a worker serves many messages, and each start costs
    seconds of torch import."""
    folder = tmp_path_factory.mktemp("site") / "worker"
    proc = start_worker(folder)
    yield folder, proc
    proc.kill()
    proc.wait(10)


def test_the_clientapp_process_never_imports_torch():
    code = "import sys, remdr.client.app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_round_through_the_worker_is_the_round_the_clientapp_would_run(tiny_data, worker):
    folder, proc = worker
    initial = _initial()
    ctx = _context(tiny_data, folder)
    via_worker = app(_message(MessageType.TRAIN, initial, 1), ctx)
    local = app(_message(MessageType.TRAIN, initial, 1), _context(tiny_data, None))
    assert not via_worker.has_error(), via_worker.error.reason if via_worker.has_error() else ""
    a = via_worker.content["arrays"].to_torch_state_dict()
    b = local.content["arrays"].to_torch_state_dict()
    assert list(a) == list(initial)  # the key order survives the wire
    # same seed, same data: the same round (to float tolerance across two processes)
    assert all(torch.allclose(a[k].double(), b[k].double(), atol=1e-6) for k in a)
    got, want = dict(via_worker.content["metrics"]), dict(local.content["metrics"])
    # the received model's validation score and the training loss (no post-training score
    # unless the run asks for local-validation)
    assert set(got) == set(want) and got["received-val-mse"] == pytest.approx(
        want["received-val-mse"]
    )
    assert got["train-loss"] == pytest.approx(want["train-loss"], rel=1e-5)
    assert via_worker.content["site"]["site-id"] == "hospA"
    # the worker keeps the run's state between messages (the site's AdamW moments): round 2
    # from the same weights differs from a fresh site's round 2
    second = app(_message(MessageType.TRAIN, initial, 2), ctx)
    fresh = app(_message(MessageType.TRAIN, initial, 2), _context(tiny_data, None))
    a2 = second.content["arrays"].to_torch_state_dict()
    b2 = fresh.content["arrays"].to_torch_state_dict()
    assert any(not torch.equal(a2[k], b2[k]) for k in a2)
    evaluation = app(_message(MessageType.EVALUATE, initial, 2), ctx)
    assert evaluation.content["metrics"]["num-val"] > 0
    assert proc.poll() is None  # still serving


def test_an_error_reply_comes_back_as_an_error(tmp_path, worker):
    folder, _ = worker
    reply = app(_message(MessageType.TRAIN, _initial(), 1), _context(tmp_path / "nope", folder))
    assert reply.has_error() and "does not exist" in reply.error.reason


def test_without_a_reachable_worker_the_clientapp_does_the_work(tiny_data, tmp_path, worker):
    folder, proc = worker
    known = (folder / AUTHKEY).read_bytes()
    (folder / AUTHKEY).write_bytes(secrets.token_bytes(32))  # a key the worker does not know
    try:
        reply = app(_message(MessageType.TRAIN, _initial(), 1), _context(tiny_data, folder))
    finally:
        (folder / AUTHKEY).write_bytes(known)  # the shared worker serves the next test
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] > 0
    assert proc.poll() is None  # refusing a wrong key does not end the worker
    gone = app(_message(MessageType.TRAIN, _initial(), 1), _context(tiny_data, tmp_path / "x"))
    assert not gone.has_error()


def test_the_worker_ends_with_its_supernode(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir(mode=0o700)
    (folder / AUTHKEY).write_bytes(secrets.token_bytes(32))
    starter = subprocess.Popen(
        [sys.executable, "-c",
         "import os, subprocess, sys, time;"
         f"subprocess.Popen([sys.executable, '-m', 'remdr.client.worker', '--folder', {str(folder)!r},"
         " '--parent', str(os.getpid())]); time.sleep(600)"],
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (folder / SOCKET).exists():
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)
    starter.kill()  # the SuperNode dies
    starter.wait(10)
    deadline = time.monotonic() + 30
    while folder.exists():
        assert time.monotonic() < deadline, "the worker outlived its SuperNode"
        time.sleep(0.2)
