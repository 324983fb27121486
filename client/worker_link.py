"""The ClientApp's side of the site worker: a message in, a reply out, over a local socket.

Imports only the standard library, numpy, safetensors and Flower, so a ClientApp process that
hands its message to the worker never loads torch. The worker's folder (node-config `worker`)
is private to the site's user (0700): it holds the Unix socket, a random key and the site's
node config. Both ends prove they know the key (an HMAC-SHA256 challenge each way) before
anything else is exchanged. Frames are length-prefixed JSON and safetensors bytes, never
pickle; a frame over its limit is refused before it is read, and every read and write has a
timeout, so a stalled or runaway peer cannot hold the worker.

A worker that cannot be reached (no folder, no socket, a wrong key) leaves the message to the
ClientApp, which handles it in its own process. A worker that took the message and then failed
does not: it may have trained, and training the round again would spend the round's privacy
budget twice, so the ClientApp answers with an error instead (`WorkerFailed`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
from collections import OrderedDict
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

log = logging.getLogger(__name__)

WORKER_KEY = "worker"  # node-config key: the worker's private folder
SOCKET = "socket"
AUTHKEY = "authkey"
NODE_CONFIG = "node-config.json"  # the site's node config, which the worker applies
KINDS = ("train", "evaluate")  # the only handlers a request may name
MAX_HEADER = 16 * 2**20  # bytes of a JSON header frame
MAX_ARRAYS = 8 * 2**30  # bytes of a safetensors frame (the model's weights)
IO_TIMEOUT = 60.0  # s for the handshake and for moving one request or reply
NONCE = 32
_CLIENT, _WORKER = b"remdr-site-worker client", b"remdr-site-worker worker"


class WorkerFailed(Exception):
    """The worker took the message but sent no reply: the ClientApp must not handle it again."""


# -- framing and the handshake -----------------------------------------------------------------


def send_frame(sock: socket.socket, data: bytes) -> None:
    size = len(data).to_bytes(8, "big")
    if len(data) <= 1 << 16:
        sock.sendall(size + data)
    else:  # the weights: no copy
        sock.sendall(size)
        sock.sendall(data)


def recv_frame(sock: socket.socket, limit: int) -> bytes:
    """One frame, refused (ValueError) when its announced length is over `limit`."""
    size = int.from_bytes(_recv_exact(sock, 8), "big")
    if size > limit:
        raise ValueError(f"a frame of {size} bytes is over the limit of {limit}")
    return bytes(_recv_exact(sock, size))


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("the peer closed the connection")
        got += k
    return buf


def _proof(key: bytes, label: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, label + nonce, hashlib.sha256).digest()


def _check(key: bytes, label: bytes, nonce: bytes, answer: bytes) -> None:
    if not hmac.compare_digest(answer, _proof(key, label, nonce)):
        raise PermissionError("the peer does not know the site worker's key")


def prove_to_client(sock: socket.socket, key: bytes) -> None:
    """The worker's half of the handshake: check the client's proof, then give its own."""
    nonce = secrets.token_bytes(NONCE)
    send_frame(sock, nonce)
    _check(key, _CLIENT, nonce, recv_frame(sock, 64))
    send_frame(sock, _proof(key, _WORKER, recv_frame(sock, NONCE)))


def prove_to_worker(sock: socket.socket, key: bytes) -> None:
    """The ClientApp's half: answer the worker's challenge, then check the worker's answer."""
    send_frame(sock, _proof(key, _CLIENT, recv_frame(sock, NONCE)))
    nonce = secrets.token_bytes(NONCE)
    send_frame(sock, nonce)
    _check(key, _WORKER, nonce, recv_frame(sock, 64))


# -- what travels ------------------------------------------------------------------------------


def encode_arrays(record: ArrayRecord | None) -> tuple[list[str], bytes]:
    """(key order, safetensors bytes) of an ArrayRecord; safetensors sorts keys, so the order
    travels beside it."""
    if record is None:
        return [], b""
    arrays = {k: np.ascontiguousarray(v.numpy()) for k, v in record.items()}
    return list(arrays), save_arrays(arrays) if arrays else b""


def decode_arrays(order: list[str], data: bytes) -> ArrayRecord:
    arrays = load_arrays(data) if data else {}
    return ArrayRecord(OrderedDict((k, Array(arrays[k])) for k in order))


def send_frames(sock: socket.socket, header: dict, data: bytes) -> None:
    send_frame(sock, json.dumps(header).encode())
    send_frame(sock, data)


def recv_frames(sock: socket.socket) -> tuple[dict, bytes]:
    header = json.loads(recv_frame(sock, MAX_HEADER))
    if not isinstance(header, dict):
        raise ValueError("a frame header is not a JSON object")
    return header, recv_frame(sock, MAX_ARRAYS)


REQUEST_FIELDS = {"kind": str, "order": list, "config": dict, "run_id": int, "node_id": int,
                  "node_config": dict, "run_config": dict, "message": dict}  # fmt: skip
MESSAGE_FIELDS = {"run_id": int, "message_id": str, "src_node_id": int, "dst_node_id": int,
                  "group_id": str, "ttl": (int, float)}  # fmt: skip


def request_problem(header: dict) -> str | None:
    """Why a request header cannot be handled, in one line; None when it can."""
    if header.get("kind") not in KINDS:
        return f"handler {str(header.get('kind'))[:40]!r} is not one of {', '.join(KINDS)}"
    for fields, where in ((REQUEST_FIELDS, header), (MESSAGE_FIELDS, header.get("message"))):
        for name, kind in fields.items():
            if not isinstance(where, dict) or not isinstance(where.get(name), kind):
                return f"the request has no valid '{name}'"
    if not all(isinstance(k, str) for k in header["order"]):
        return "the request's array names are not strings"
    return None


def request_header(kind: str, msg: Message, context: Context, order: list[str]) -> dict:
    meta = msg.metadata
    config = dict(msg.content["config"]) if "config" in msg.content else {}
    return {
        "kind": kind,
        "order": order,
        "config": config,
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
        "message": {
            "run_id": meta.run_id,
            "message_id": meta.message_id,
            "src_node_id": meta.src_node_id,
            "dst_node_id": meta.dst_node_id,
            "group_id": meta.group_id,
            "ttl": meta.ttl,
        },
    }


def error_header(code: int, reason: str) -> dict:
    return {"error": {"code": code, "reason": reason}}


def reply_header(reply: Message) -> tuple[dict, bytes]:
    """A handler's reply as (header, array bytes) for the wire."""
    if reply.has_error():
        return error_header(reply.error.code, reply.error.reason), b""
    content = reply.content
    order, data = encode_arrays(content.get("arrays"))
    header = {
        "order": order,
        "metrics": dict(content["metrics"]) if "metrics" in content else None,
        "site": dict(content["site"]) if "site" in content else None,
    }
    return header, data


def rebuild_reply(msg: Message, header: dict, data: bytes) -> Message:
    if "error" in header:
        err = header["error"]
        return Message(Error(code=int(err["code"]), reason=str(err["reason"])), reply_to=msg)
    content = RecordDict()
    if header["order"]:
        content["arrays"] = decode_arrays(header["order"], data)
    if header.get("metrics") is not None:
        content["metrics"] = MetricRecord(header["metrics"])
    if header.get("site") is not None:
        content["site"] = ConfigRecord(header["site"])
    return Message(content=content, reply_to=msg)


# -- the ClientApp's call ----------------------------------------------------------------------


def _reply_timeout(context: Context) -> float:
    """How long the ClientApp waits for the worker's reply: the coordinator's round timeout
    (no reply counts after it), at least a minute."""
    try:
        return max(IO_TIMEOUT, float(context.run_config.get("round-timeout", 86400.0)))
    except (TypeError, ValueError):
        return 86400.0


def ask_worker(kind: str, msg: Message, context: Context) -> Message | None:
    """The worker's reply to `msg`; None when the site has no worker or cannot reach it (then
    the worker never saw the message). Raises WorkerFailed when the worker took the message
    but no reply came back."""
    folder = str(context.node_config.get(WORKER_KEY, ""))
    if not folder:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(IO_TIMEOUT)
        sock.connect(str(Path(folder) / SOCKET))
        prove_to_worker(sock, (Path(folder) / AUTHKEY).read_bytes())
    except (OSError, EOFError, ValueError) as err:
        sock.close()
        log.warning("site worker unavailable (%s); handling the message in this process", err)
        return None
    with sock:  # from here on the worker may train: no second try in this process
        try:
            order, data = encode_arrays(msg.content.get("arrays"))
            send_frames(sock, request_header(kind, msg, context, order), data)
            sock.settimeout(_reply_timeout(context))
            header, body = recv_frames(sock)
            return rebuild_reply(msg, header, body)
        except (OSError, EOFError, ValueError, KeyError, TypeError) as err:
            raise WorkerFailed(
                f"the site worker took this {kind} message and sent no reply ({err}); not "
                "handled again here, so the round's privacy budget is never spent twice"
            ) from err
