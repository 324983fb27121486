"""The Flower ClientApp: hands each message to the site's handlers and returns their reply.

Flower starts a fresh process for every message. A site started with `remdr-client start` also
runs a long-lived worker (`remdr.client.worker`) that holds torch, the model code and the site's
data between rounds; this module then imports only Flower and numpy and passes the message to it
over a local socket that only the site's own user can open (`remdr.client.worker_link`). On stock
`flower-supernode`, or when the worker is down, the same handlers (`remdr.client.site_handlers`)
run in this process: slower, never different.

Node config (set by `remdr-client` or the simulator): `data-path` (the site's data folder),
`site-id`, `worker` (the worker's private folder), `ledger` (the site's append-only privacy
ledger) and the rest of the site's policy (`remdr.client.site_policy`: its ceiling, delta,
metrics, `require-dp`, the fault-drill opt-in). The coordinator's run config can never move the
ledger or loosen the policy. Before anything else, the ClientApp checks the app bundle it was
loaded from (`remdr.client.bundle_check`) and refuses one this site does not run. Models cross
Flower's links packed into one array each way (`remdr.federation.transport`); the handlers and
the worker see the named arrays.
"""

from __future__ import annotations

import sys

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from remdr.client.bundle_check import bundle_problem
from remdr.client.worker_link import WorkerFailed, ask_worker

from remdr.federation.transport import TransportError, pack_records, unpack_records

app = ClientApp()

VERSION_MISMATCH = 1001
SITE_ERROR = 1002
PRIVACY_DECLINED = 1003
BUNDLE_REFUSED = 1004


def _handle(kind: str, msg: Message, context: Context) -> Message:
    return packed(site_reply(kind, msg, context))


def packed(reply: Message) -> Message:
    """`reply` as it crosses the link: each model record one blob (an error as it is)."""
    if not reply.has_error():
        reply.content = pack_records(reply.content)
    return reply


def site_reply(kind: str, msg: Message, context: Context) -> Message:
    """The site's reply to a train or evaluate message, records not yet packed."""
    site = context.node_config.get("site-id", f"node-{context.node_id}")
    problem = bundle_problem(context.node_config, sys.path)
    if problem is not None:
        return Message(Error(code=BUNDLE_REFUSED, reason=f"site {site}: {problem}"), reply_to=msg)
    try:
        msg.content = unpack_records(msg.content)
    except TransportError as err:
        reason = f"site {site}: the coordinator's message is unreadable: {err}"
        return Message(Error(code=SITE_ERROR, reason=reason), reply_to=msg)
    try:
        reply = ask_worker(kind, msg, context)
    except WorkerFailed as err:  # it may have trained: never a second time in this process
        return Message(Error(code=SITE_ERROR, reason=f"site {site}: {err}"), reply_to=msg)
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
