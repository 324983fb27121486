"""The site worker holds against bad requests, and a worker failure never spends a round twice
(issue 23): only `train` and `evaluate` run, no request ends the worker, frames have a size
limit and reads a timeout, the worker applies the site's own node config, and a message the
worker took is never trained again by the ClientApp's fallback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from flwr.app import MessageType
from remdr.client.app import PRIVACY_DECLINED, SITE_ERROR
from remdr.client.worker_link import (
    AUTHKEY,
    SOCKET,
    prove_to_worker,
    recv_frames,
    send_frame,
    send_frames,
)
from site_app import app
from test_client_app import RUN_CONFIG, _context, _initial, _message
from test_site_policy import DP_ONE_STEP
from test_site_worker import start_worker

from remdr.privacy import PrivacyLedger


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_data):
    """A worker as `remdr-client start` starts it, with the site's node config (its data, its
    ledger, no ceiling of its own) and a 3 s read timeout."""
    root = tmp_path_factory.mktemp("site")
    ledger = root / "hospA" / "privacy-ledger.jsonl"
    node = {"data-path": str(tiny_data), "site-id": "hospA", "ledger": str(ledger)}
    proc = start_worker(root / "worker", node, "--io-timeout", "3")
    yield root / "worker", proc, ledger
    proc.kill()
    proc.wait(10)


def _connect(folder: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(60)
    sock.connect(str(folder / SOCKET))
    prove_to_worker(sock, (folder / AUTHKEY).read_bytes())
    return sock


def _ask(folder: Path, header: dict, data: bytes = b"") -> dict:
    with _connect(folder) as sock:
        send_frames(sock, header, data)
        return recv_frames(sock)[0]


def _header(kind: str = "evaluate", **changes) -> dict:
    header = {
        "kind": kind, "order": [], "config": {"server-round": 1}, "run_id": 1, "node_id": 7,
        "node_config": {}, "run_config": RUN_CONFIG,
        "message": {"run_id": 1, "message_id": "m", "src_node_id": 0, "dst_node_id": 7,
                    "group_id": "1", "ttl": 60.0},
    }  # fmt: skip
    return {**header, **changes}


def _still_serves(folder: Path, proc: subprocess.Popen) -> None:
    """The worker is up and answers the next request."""
    assert proc.poll() is None, "the worker ended"
    assert "error" in _ask(folder, _header("_setup"))


def _evaluates(folder: Path, tiny_data) -> None:
    """A real message through the ClientApp and the worker."""
    msg = _message(MessageType.EVALUATE, _initial(RUN_CONFIG), {"server-round": 1})
    reply = app(msg, _context(tiny_data, RUN_CONFIG, worker=str(folder)))
    assert not reply.has_error() and reply.content["metrics"]["num-val"] > 0


@pytest.mark.parametrize("kind", ["_setup", "split_key", "__init__", 7])
def test_the_worker_runs_only_its_train_and_evaluate_handlers(site, tiny_data, kind):
    folder, proc, _ = site
    reply = _ask(folder, _header(kind))
    assert reply["error"]["code"] == SITE_ERROR and "not one of train, evaluate" in str(reply)
    _still_serves(folder, proc)
    if kind == 7:  # and still trains and evaluates
        _evaluates(folder, tiny_data)


@pytest.mark.parametrize(
    "header, data",
    [
        (_header(message={"run_id": 1}), b""),  # a message without its ids
        (_header(order="arrays"), b""),  # the array names are not a list
        (_header(order=["w"]), b"not safetensors"),  # the handler's input cannot be decoded
    ],
)
def test_no_request_ends_the_worker(site, tiny_data, header, data):
    folder, proc, _ = site
    reply = _ask(folder, header, data)
    assert reply["error"]["code"] == SITE_ERROR and "\n" not in reply["error"]["reason"]
    _still_serves(folder, proc)


def test_a_frame_over_the_limit_is_refused_before_it_is_read(site, tiny_data):
    folder, proc, _ = site
    with _connect(folder) as sock:
        sock.sendall((2**40).to_bytes(8, "big"))  # a 1 TiB header, never sent
        reply = recv_frames(sock)[0]
    assert "over the limit" in reply["error"]["reason"]
    _still_serves(folder, proc)


def test_a_stalled_peer_holds_the_worker_only_until_its_timeout(site, tiny_data):
    folder, proc, _ = site
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(folder / SOCKET))  # says nothing: no handshake, no request
    half = _connect(folder)
    send_frame(half, b"\x00" * 4)  # half a header's length, then silence
    done = threading.Event()
    threading.Thread(target=lambda: (_evaluates(folder, tiny_data), done.set())).start()
    try:
        assert done.wait(90), "a stalled peer held the worker"
    finally:
        stalled.close()
        half.close()


def test_the_worker_applies_the_sites_own_node_config(site, tiny_data, tmp_path):
    """The ClientApp's request claims another ledger and a ceiling of 1e9; the worker keeps the
    site's: its ledger, its default ceiling of 10, so a round costing 20 is declined."""
    folder, _, ledger = site
    elsewhere = tmp_path / "elsewhere.jsonl"
    hostile = {**DP_ONE_STEP, "dp-noise": 0.3, "dp-epsilon-max": 1e9}
    ctx = _context(tiny_data, hostile, worker=str(folder), ledger=str(elsewhere))
    ctx.node_config["epsilon-max"] = 1e9
    reply = app(_message(MessageType.TRAIN, _initial(hostile), {"server-round": 1}), ctx)
    assert reply.has_error() and reply.error.code == PRIVACY_DECLINED
    assert "ceiling 10" in reply.error.reason
    assert not elsewhere.exists() and PrivacyLedger(ledger).entries() == []


def test_a_message_is_trained_at_most_once_at_a_site(tiny_data, tmp_path):
    """The same message again (any path: the worker, the fallback, a re-delivery) is refused
    by the site's journal; a private method's round would otherwise be spent twice."""
    ledger = tmp_path / "hospA.jsonl"
    quick = {**RUN_CONFIG, "method": "concat", "local-steps": 2}
    msg = _message(MessageType.TRAIN, _initial(quick), {"server-round": 1})
    first = app(msg, _context(tiny_data, quick, ledger=str(ledger)))
    assert not first.has_error(), first.error.reason
    again = app(msg, _context(tiny_data, quick, ledger=str(ledger)))
    assert again.has_error() and again.error.code == PRIVACY_DECLINED
    assert "already started" in again.error.reason and "\n" not in again.error.reason
    other = _message(MessageType.TRAIN, _initial(quick), {"server-round": 1})
    assert not app(other, _context(tiny_data, quick, ledger=str(ledger))).has_error()


def test_a_worker_that_fails_mid_round_is_not_retried_by_the_clientapp(tiny_data, tmp_path):
    """The worker starts a private round and dies: the ClientApp answers with an error instead
    of training the round itself, so the round's budget is never spent a second time."""
    ledger = tmp_path / "hospA" / "privacy-ledger.jsonl"
    node = {"data-path": str(tiny_data), "site-id": "hospA", "ledger": str(ledger)}
    folder = tmp_path / "worker"
    proc = start_worker(folder, node)
    long_round = {**DP_ONE_STEP, "dp-noise": 4.0, "local-epochs": 200, "batch-size": 4}  # eps ~8
    msg = _message(MessageType.TRAIN, _initial(long_round), {"server-round": 1})
    replies = []
    asking = threading.Thread(
        target=lambda: replies.append(
            app(msg, _context(tiny_data, long_round, ledger=str(ledger), worker=str(folder)))
        )
    )
    asking.start()
    try:
        started = ledger.parent / "privacy-ledger-site-state"
        deadline = time.monotonic() + 120
        while not list(started.rglob("started/*")):
            assert time.monotonic() < deadline and asking.is_alive(), "the round did not start"
            time.sleep(0.1)
        time.sleep(1.0)  # training
        os.kill(proc.pid, signal.SIGKILL)  # the worker dies mid-round
        asking.join(120)
    finally:
        proc.kill()
        proc.wait(10)
    (reply,) = replies
    assert reply.has_error() and reply.error.code == SITE_ERROR
    assert "not handled again" in reply.error.reason and "\n" not in reply.error.reason
    assert PrivacyLedger(ledger).entries() == []  # the dead worker's steps never left it
