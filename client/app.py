"""The Flower ClientApp: hands each message to the site's handlers and returns their reply.

Flower starts a fresh process for every message. A site started with `remdr-client start` also
runs a long-lived worker (`remdr.client.worker`) that holds torch, the model code and the site's
data between rounds; this module then imports only Flower and numpy and passes the message to it
over a local socket that only the site's own user can open (`remdr.client.worker_link`). On stock
`flower-supernode`, or when the worker is down, the same handlers (`remdr.client.site_handlers`)
run in this process: slower, never different.

Node config (set by `remdr-client` or the simulator): `data-path` (the site's data folder),
`site-id`, `worker` (the worker's private folder), and the site's privacy policy: `ledger` (its
append-only privacy ledger), `epsilon-max` (its ceiling; the coordinator can only lower it) and
`require-dp` (refuse methods that do not train under DP-SGD). The coordinator's run config can
never move the ledger or raise the ceiling.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from remdr.client.worker_link import ask_worker

app = ClientApp()

VERSION_MISMATCH = 1001
SITE_ERROR = 1002
PRIVACY_DECLINED = 1003


def _handle(kind: str, msg: Message, context: Context) -> Message:
    reply = ask_worker(kind, msg, context)
    if reply is not None:
        return reply
    from remdr.client import site_handlers  # torch and the site's data, loaded for this message

    return getattr(site_handlers, kind)(msg, context)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return _handle("train", msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle("evaluate", msg, context)
