"""The site worker: one long-lived process per site that runs its train and evaluate messages.

Flower starts a fresh ClientApp process per message, which would import torch and set up the
model every round. `remdr-client start` starts this worker beside the SuperNode; it imports the
site's handlers once and serves the ClientApp's requests on a Unix socket in a private folder
(see `remdr.client.worker_link`). It keeps each Flower run's `context.state` in memory, as the
SuperNode would, and exits when the process that started it (the SuperNode) is gone.

The worker applies the site's own node config (`node-config.json` in its folder, written by
`remdr-client start`) to every request, whatever node config the request carries, and runs only
the `train` and `evaluate` handlers. No request can end it: a malformed one, a frame over its
limit, a stalled peer (a timeout) or a failing handler each get an error reply or a log line.

    python -m remdr.client.worker --folder DIR --parent PID [--label TEXT] [--io-timeout S]
                                  [--threads N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict
from remdr.client.worker_link import (
    AUTHKEY,
    IO_TIMEOUT,
    NODE_CONFIG,
    SOCKET,
    decode_arrays,
    error_header,
    prove_to_client,
    recv_frames,
    reply_header,
    request_problem,
    send_frames,
)

log = logging.getLogger("remdr.client.worker")


def handle(header: dict, data: bytes, states: dict[int, RecordDict], node: dict | None) -> Message:
    """Run one checked request (`request_problem`) through the site's handlers, exactly as the
    ClientApp would, under the site's node config `node` (the request's own when None)."""
    from remdr.client import site_handlers

    m = header["message"]
    meta = Metadata(
        run_id=m["run_id"], message_id=m["message_id"], src_node_id=m["src_node_id"],
        dst_node_id=m["dst_node_id"], reply_to_message_id="", group_id=m["group_id"],
        created_at=time.time(), ttl=m["ttl"], message_type=header["kind"],
    )  # fmt: skip
    content = RecordDict({"config": ConfigRecord(header["config"])})
    if header["order"]:
        content["arrays"] = decode_arrays(header["order"], data)
    msg = Message(content=content, metadata=meta)
    context = Context(
        run_id=header["run_id"],
        node_id=header["node_id"],
        node_config=node if node is not None else header["node_config"],
        state=states.setdefault(header["run_id"], RecordDict()),
        run_config=header["run_config"],
    )
    handler = {"train": site_handlers.train, "evaluate": site_handlers.evaluate}[header["kind"]]
    return handler(msg, context)


def answer(
    conn: socket.socket, states: dict[int, RecordDict], node: dict | None, timeout: float
) -> None:
    """Read one request from an authenticated peer and send its reply. Whatever happens, the
    worker goes on: every failure is an error reply (if the peer still listens) or a log line."""
    from remdr.client.app import SITE_ERROR

    try:
        header, data = recv_frames(conn)
    except (OSError, EOFError, ValueError) as err:  # a stalled peer, an oversized frame
        log.warning("site worker: a request failed in transit (%s)", err)
        _send(conn, error_header(SITE_ERROR, f"site worker: request refused ({err})"), b"", timeout)
        return
    start = time.perf_counter()
    problem = request_problem(header)
    if problem is not None:
        log.warning("site worker: request refused: %s", problem)
        reply = error_header(SITE_ERROR, f"site worker: request refused: {problem}"), b""
    else:
        try:
            reply = reply_header(handle(header, data, states, node))
        except Exception as err:  # the handlers answer RemdrErrors themselves; this is a bug
            log.exception("site worker: %s failed", header["kind"])
            reason = " ".join(f"site worker: {type(err).__name__}: {err}".split())[:300]
            reply = error_header(SITE_ERROR, reason), b""
        round_ = header["config"].get("server-round", "?")
        log.info(
            "site worker: %s round %s in %.1fs",
            header["kind"], round_, time.perf_counter() - start,
        )  # fmt: skip
    _send(conn, *reply, timeout)


def _send(conn: socket.socket, header: dict, data: bytes, timeout: float) -> None:
    try:
        conn.settimeout(timeout)
        send_frames(conn, header, data)
    except (OSError, ValueError) as err:
        log.warning("site worker: a reply failed in transit (%s)", err)


def _exit_with(parent: int, folder: Path) -> None:
    """End this worker (and its folder) once the SuperNode that started it is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def size_threads(threads: int) -> int:
    """Give torch `threads` threads (0: what OMP_NUM_THREADS, which `remdr-client start` sets,
    or torch's own default says): its intra-op pool and its inter-op pool, which otherwise
    starts one thread per core whatever OMP_NUM_THREADS says. Sites that share a machine each
    get their share (`--threads`), so their threads do not spin against each other."""
    import torch

    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads > 0:
        torch.set_num_threads(threads)
        # the inter-op pool can be sized only before it first runs
        with contextlib.suppress(RuntimeError):
            torch.set_num_interop_threads(threads)
    return torch.get_num_threads()


def serve(folder: Path, parent: int, timeout: float = IO_TIMEOUT, threads: int = 0) -> None:
    from remdr.client import site_handlers  # noqa: F401  torch and the model code, once

    threads = size_threads(threads)

    key = (folder / AUTHKEY).read_bytes()
    own = folder / NODE_CONFIG
    node = json.loads(own.read_text()) if own.is_file() else None
    threading.Thread(target=_exit_with, args=(parent, folder), daemon=True).start()
    states: dict[int, RecordDict] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(folder / SOCKET))
        listener.listen(8)
        log.info("site worker ready in %s (%d torch threads)", folder, threads)
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as err:
                log.warning("site worker: accept failed (%s)", err)
                continue
            with conn:
                conn.settimeout(timeout)  # a stalled peer holds the worker this long at most
                try:
                    prove_to_client(conn, key)
                except (OSError, EOFError, ValueError) as err:
                    log.warning("site worker: refused a connection (%s)", err)
                    continue
                answer(conn, states, node, timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="remdr-site-worker", description=__doc__)
    ap.add_argument("--folder", required=True, help="private folder with the key; gets the socket")
    ap.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    ap.add_argument("--label", default="", help="shown in process lists (site and port)")
    ap.add_argument(
        "--io-timeout", type=float, default=IO_TIMEOUT, help="s a peer may stall a read or write"
    )
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (default: $OMP_NUM_THREADS)"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    serve(Path(args.folder), args.parent, args.io_timeout, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
