"""The ClientApp's side of the site worker: a message in, a reply out, over a local socket.

Imports only the standard library, numpy, safetensors and Flower, so a ClientApp process that
hands its message to the worker never loads torch. The worker's folder (node-config `worker`)
is private to the site's user (0700): it holds the Unix socket and a random key that both ends
prove they know (`multiprocessing.connection`'s HMAC handshake) before anything is exchanged.
Frames are JSON and safetensors bytes, never pickle. Any failure to reach the worker returns
None, and the ClientApp handles the message itself.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection
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


def send_frames(conn: Connection, header: dict, data: bytes) -> None:
    conn.send_bytes(json.dumps(header).encode())
    conn.send_bytes(data)


def recv_frames(conn: Connection) -> tuple[dict, bytes]:
    return json.loads(conn.recv_bytes()), conn.recv_bytes()


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


def reply_header(reply: Message) -> tuple[dict, bytes]:
    """A handler's reply as (header, array bytes) for the wire."""
    if reply.has_error():
        return {"error": {"code": reply.error.code, "reason": reply.error.reason}}, b""
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


def ask_worker(kind: str, msg: Message, context: Context) -> Message | None:
    """The worker's reply to `msg`, or None when the site has no worker or cannot reach it."""
    folder = str(context.node_config.get(WORKER_KEY, ""))
    if not folder:
        return None
    try:
        key = (Path(folder) / AUTHKEY).read_bytes()
        order, data = encode_arrays(msg.content.get("arrays"))
        with Client(str(Path(folder) / SOCKET), family="AF_UNIX", authkey=key) as conn:
            send_frames(conn, request_header(kind, msg, context, order), data)
            header, body = recv_frames(conn)
    except (OSError, EOFError, AuthenticationError, ValueError) as err:
        log.warning("site worker unavailable (%s); handling the message in this process", err)
        return None
    return rebuild_reply(msg, header, body)
