"""The site worker: one long-lived process per site that runs its train and evaluate messages.

Flower starts a fresh ClientApp process per message, which would import torch and set up the
model every round. `remdr-client start` starts this worker beside the SuperNode; it imports the
site's handlers once and serves the ClientApp's requests on a Unix socket in a private folder
(see `remdr.client.worker_link`). It keeps each Flower run's `context.state` in memory, as the
SuperNode would, and exits when the process that started it (the SuperNode) is gone.

    python -m remdr.client.worker --folder DIR --parent PID [--label TEXT]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import threading
import time
from multiprocessing import AuthenticationError
from multiprocessing.connection import Listener
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, Metadata, RecordDict
from remdr.client.worker_link import (
    AUTHKEY,
    SOCKET,
    decode_arrays,
    recv_frames,
    reply_header,
    send_frames,
)

log = logging.getLogger("remdr.client.worker")


def handle(header: dict, data: bytes, states: dict[int, RecordDict]) -> Message:
    """Run one request through the site's handlers, exactly as the ClientApp would."""
    from remdr.client import site_handlers
    from remdr.client.app import SITE_ERROR

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
        node_config=header["node_config"],
        state=states.setdefault(header["run_id"], RecordDict()),
        run_config=header["run_config"],
    )
    try:
        return getattr(site_handlers, header["kind"])(msg, context)
    except Exception as err:  # the handlers answer RemdrErrors themselves; this is a bug
        log.exception("site worker: %s failed", header["kind"])
        reason = f"site worker: {type(err).__name__}: {err}"[:300]
        return Message(Error(code=SITE_ERROR, reason=reason), reply_to=msg)


def _exit_with(parent: int, folder: Path) -> None:
    """End this worker (and its folder) once the SuperNode that started it is gone."""
    while os.getppid() == parent:
        time.sleep(1.0)
    shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


def serve(folder: Path, parent: int) -> None:
    from remdr.client import site_handlers  # noqa: F401  torch and the model code, once

    key = (folder / AUTHKEY).read_bytes()
    threading.Thread(target=_exit_with, args=(parent, folder), daemon=True).start()
    states: dict[int, RecordDict] = {}
    with Listener(str(folder / SOCKET), family="AF_UNIX", authkey=key) as listener:
        import torch

        log.info("site worker ready in %s (%d torch threads)", folder, torch.get_num_threads())
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as err:
                log.warning("site worker: refused a connection (%s)", err)
                continue
            with conn:
                try:
                    header, data = recv_frames(conn)
                    start = time.perf_counter()
                    reply = handle(header, data, states)
                    send_frames(conn, *reply_header(reply))
                    round_ = header["config"].get("server-round", "?")
                    log.info(
                        "site worker: %s round %s in %.1fs",
                        header["kind"], round_, time.perf_counter() - start,
                    )  # fmt: skip
                except (OSError, EOFError, ValueError) as err:
                    log.warning("site worker: a request failed in transit (%s)", err)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="remdr-site-worker", description=__doc__)
    ap.add_argument("--folder", required=True, help="private folder with the key; gets the socket")
    ap.add_argument("--parent", type=int, required=True, help="exit when this process is gone")
    ap.add_argument("--label", default="", help="shown in process lists (site and port)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    serve(Path(args.folder), args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
