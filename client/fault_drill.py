"""A fault-drill ClientApp: the production handlers, but a site may send bad updates on purpose.

For drills only (`deploy/chaos --bad-site`, tests/test_faults_e2e.py). SuperNodes load the
ClientApp the app bundle names, so a drill selects this one for the whole run with
`remdr-server run --fault-drill`; a site runs it only if it opted in (`remdr-client start
--allow-fault-drill`: `remdr.client.bundle_check` refuses the drill's bundle otherwise). Every
site then trains as in production; one whose SuperNode was
started with `REMDR_FAULT_UPDATE=nan,norm` corrupts its train reply (round r sends the r-th kind,
cycled), and the coordinator must name and refuse it. The production ClientApp
(`remdr.client.app`) never reads the variable and never imports this module.
"""

from __future__ import annotations

import logging
import os

import torch  # noqa: F401  Flower's to_torch_state_dict needs torch already imported
from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp
from remdr.client.app import evaluate, packed, site_reply

log = logging.getLogger(__name__)
app = ClientApp()

FAULT_ENV = "REMDR_FAULT_UPDATE"  # on a SuperNode: the kinds of bad update this site sends
FAULTS = ("nan", "inf", "shape", "keys", "norm")


def corrupt_update(state: dict, kind: str) -> dict:
    """A deliberately malformed copy of a site's weights (torch tensors)."""
    if kind not in FAULTS:
        raise ValueError(f"unknown fault {kind!r}; one of {', '.join(FAULTS)}")
    out = {k: v.clone() for k, v in state.items()}
    key = next(k for k, v in out.items() if v.is_floating_point() and v.numel() > 1)
    if kind in ("nan", "inf"):
        out[key].view(-1)[0] = float(kind)
    elif kind == "shape":
        out[key] = out[key].flatten()[:-1]
    elif kind == "keys":
        out[key + "_renamed"] = out.pop(key)
    else:
        for k, v in out.items():
            if v.is_floating_point():
                out[k] = v * 1e6
    return out


def fault_for_round(spec: str, server_round: int) -> str | None:
    """The fault a drill asks for in this round (comma list, cycled); None without a drill."""
    kinds = [k.strip() for k in spec.split(",") if k.strip()]
    return kinds[(server_round - 1) % len(kinds)] if kinds else None


@app.train()
def train_with_fault(msg: Message, context: Context) -> Message:
    reply = site_reply("train", msg, context)
    kind = fault_for_round(
        os.environ.get(FAULT_ENV, ""), int(msg.content["config"].get("server-round", 1))
    )
    if kind and not reply.has_error():
        site = reply.content["site"]["site-id"]
        log.warning("site %s: fault drill, sending a '%s' update", site, kind)
        state = reply.content["arrays"].to_torch_state_dict()
        reply.content["arrays"] = ArrayRecord(corrupt_update(state, kind))
    return packed(reply)


app.evaluate()(evaluate)  # evaluation is never drilled: the production handler
