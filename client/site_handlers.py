"""What a site does with a train or evaluate message: `remdr.federation` calls, and the reply.

The ClientApp (`remdr.client.app`) hands each message here, either in its own process (stock
`flower-supernode`) or through the site's long-lived worker (`remdr.client.worker`), which keeps
torch and the site's data loaded between rounds; the code and the replies are the same.

The node config keys are described in `remdr.client.app`. Cross-round state (the method's EMA
modality scores, the site's AdamW moments and, with FedBN, its own normalisation layers) lives on
the site's disk beside its ledger, per coordinator run (`remdr.federation.site_state`), so it
survives a coordinator restart, which starts a new Flower run with an empty `context.state`; a
site without a ledger keeps it in `context.state` only (`RunMemory`). Replies carry weights and
aggregate metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from remdr.client.app import PRIVACY_DECLINED, SITE_ERROR, VERSION_MISMATCH

from remdr import __version__
from remdr.errors import PrivacyError, RemdrError
from remdr.federation.run_config import split_run_config, versions_compatible
from remdr.federation.site_round import SiteData, evaluate_global, load_site, train_round
from remdr.federation.site_state import (
    Carried,
    SiteState,
    flatten_optimizer,
    unflatten_optimizer,
)
from remdr.registry import get_spec

log = logging.getLogger(__name__)


def _site_id(context: Context) -> str:
    if "site-id" in context.node_config:
        return str(context.node_config["site-id"])
    if "partition-id" in context.node_config:  # a virtual node of the simulator
        return f"site-{context.node_config['partition-id']}"
    return f"node-{context.node_id}"


def _data_path(context: Context, sim_data_root: str) -> str:
    """A real site names its folder in node config; virtual node k reads <root>/site-<k>."""
    if context.node_config.get("data-path"):
        return str(context.node_config["data-path"])
    if sim_data_root and "partition-id" in context.node_config:
        return f"{sim_data_root}/site-{context.node_config['partition-id']}"
    raise RemdrError("node config has no data-path", "", "start the SuperNode with remdr-client")


def _site_error(msg: Message, context: Context, err: RemdrError) -> Message:
    """The error reply the coordinator's report shows: a privacy refusal or any other failure."""
    code = PRIVACY_DECLINED if isinstance(err, PrivacyError) else SITE_ERROR
    return Message(Error(code=code, reason=f"site {_site_id(context)}: {err}"), reply_to=msg)


def _setup(msg: Message, context: Context):
    """Check version and config, load the site's data. Returns (cfg, fed, site) or an error reply."""
    config = msg.content["config"] if "config" in msg.content else ConfigRecord()
    server_version = str(config.get("remdr-version", __version__))
    if not versions_compatible(server_version):
        reason = f"site {_site_id(context)} runs remdr {__version__}, the server {server_version}: install a matching version"
        return Message(Error(code=VERSION_MISMATCH, reason=reason), reply_to=msg)
    try:
        cfg, fed = split_run_config(dict(context.run_config))
        cfg = _site_privacy(cfg, fed, context)
        site = _load_site(_data_path(context, fed.sim_data_root), cfg, context)
    except RemdrError as err:
        return _site_error(msg, context, err)
    return cfg, fed, site


# Simulation workers (Ray actors) run many messages in one process: a virtual site's data is
# loaded once per worker. Deployment starts a process per message, so there the site's disk
# cache of decoded tensors (`load_site(cache=True)`) is what saves the work.
_SIM_SITES: dict[tuple, SiteData] = {}


def _load_site(data_path: str, cfg, context: Context) -> SiteData:
    if "partition-id" not in context.node_config:
        return load_site(data_path, cfg, seed=cfg.train.seed, cache=True)
    key = (data_path, cfg.train.seed, json.dumps(dataclasses.asdict(cfg.data), sort_keys=True))
    if key not in _SIM_SITES:
        _SIM_SITES[key] = load_site(data_path, cfg, seed=cfg.train.seed, cache=True)
    return _SIM_SITES[key]


def _ledger(context: Context, fed) -> str:
    """The site's privacy ledger: its node config's, or the simulator's per virtual node."""
    node = context.node_config
    ledger = str(node.get("ledger", ""))
    if not ledger and fed.sim_data_root and "partition-id" in node:
        ledger = str(Path(fed.sim_data_root) / "ledgers" / f"site-{node['partition-id']}.jsonl")
    return ledger


class RunMemory:
    """`SiteState`'s interface over `context.state`, for a site without a ledger (so without a
    folder of its own): the latest round's state, for as long as this Flower run lasts."""

    def __init__(self, state: RecordDict) -> None:
        self.state = state

    def load(self, before: int) -> Carried:
        state = self.state
        if "method" not in state:
            return Carried()
        method = state["method"]
        arrays = {k: state[k].to_torch_state_dict() for k in ("fedbn", "control") if k in state}
        optimizer = (
            unflatten_optimizer(state["optimizer"].to_torch_state_dict(), method["optimizer"])
            if "optimizer" in state
            else None
        )
        return Carried(
            json.loads(method["json"]), arrays.get("fedbn"), optimizer, arrays.get("control")
        )

    def save(self, server_round: int, carried: Carried) -> None:
        method = {"json": json.dumps(carried.method or {})}
        if carried.local:
            self.state["fedbn"] = ArrayRecord(carried.local)
        if carried.control:
            self.state["control"] = ArrayRecord(carried.control)
        if carried.optimizer:
            moments, method["optimizer"] = flatten_optimizer(carried.optimizer)
            self.state["optimizer"] = ArrayRecord(moments)
        self.state["method"] = ConfigRecord(method)


def _site_state(msg: Message, context: Context, fed) -> SiteState | RunMemory:
    """The site's cross-round state for this coordinator run, beside its ledger; keyed by the
    run key the coordinator sends (else its run directory's name), not by Flower's run id."""
    ledger = _ledger(context, fed)
    if not ledger:  # no site folder: the state lives only as long as this Flower run
        return RunMemory(context.state)
    config = msg.content["config"] if "config" in msg.content else ConfigRecord()
    key = str(config.get("remdr-run", "")) or Path(fed.out_dir).name
    return SiteState(Path(ledger).parent / f"{Path(ledger).stem}-site-state", key)


def _site_privacy(cfg, fed, context: Context):
    """The site's own privacy policy overrides the run config: its ledger, its ceiling."""
    node = context.node_config
    ledger = _ledger(context, fed)
    ceiling = min(
        float(node.get("epsilon-max", cfg.privacy.dp_epsilon_max)), cfg.privacy.dp_epsilon_max
    )
    private = get_spec(cfg.train.method).private
    if str(node.get("require-dp", "false")).lower() == "true" and not private:
        raise PrivacyError(
            f"method {cfg.train.method} declined",
            "this site only trains under DP-SGD (require-dp)",
            "ask the coordinator for a private method such as remdr_dp",
        )
    if private and not ledger:
        raise PrivacyError("no privacy ledger configured", "", "start remdr-client with --ledger")
    privacy = dataclasses.replace(cfg.privacy, dp_ledger=ledger, dp_epsilon_max=ceiling)
    return dataclasses.replace(cfg, privacy=privacy)


def _site_record(context: Context) -> ConfigRecord:
    return ConfigRecord({"site-id": _site_id(context), "remdr-version": __version__})


def train(msg: Message, context: Context) -> Message:
    setup = _setup(msg, context)
    if isinstance(setup, Message):
        return setup
    cfg, fed, site = setup
    server_round = int(msg.content["config"].get("server-round", 1))
    store = _site_state(msg, context, fed)
    carried = store.load(before=server_round)
    server_control = (
        msg.content["control"].to_torch_state_dict() if "control" in msg.content else None
    )
    try:
        result = train_round(
            cfg,
            fed,
            msg.content["arrays"].to_torch_state_dict(),
            site,
            server_round=server_round,
            carried=carried,
            server_control=server_control,
            ledger_label={"run": str(context.run_id), "site": _site_id(context)},
        )
    except RemdrError as err:  # declined by privacy, or a training failure: one line, no traceback
        log.warning("site %s: %s", _site_id(context), err)
        return _site_error(msg, context, err)
    store.save(server_round, result.carried)
    content = RecordDict(
        {
            "arrays": ArrayRecord(result.state),
            "metrics": MetricRecord(result.metrics),
            "site": _site_record(context),
        }
    )
    if result.control_delta is not None:  # SCAFFOLD: the change of c_i, screened like weights
        content["control"] = ArrayRecord(result.control_delta)
    return Message(content=content, reply_to=msg)


def evaluate(msg: Message, context: Context) -> Message:
    setup = _setup(msg, context)
    if isinstance(setup, Message):
        return setup
    cfg, fed, site = setup
    local = None
    if fed.fedbn:  # the layers this site's latest training left, this round included
        server_round = int(msg.content["config"].get("server-round", 1))
        local = _site_state(msg, context, fed).load(before=server_round + 1).local
    try:
        metrics = evaluate_global(cfg, msg.content["arrays"].to_torch_state_dict(), site, local)
    except RemdrError as err:
        log.warning("site %s: %s", _site_id(context), err)
        return _site_error(msg, context, err)
    metrics["num-examples"] = metrics["num-val"]
    metrics["unit-weight"] = 1.0
    content = RecordDict({"metrics": MetricRecord(metrics), "site": _site_record(context)})
    return Message(content=content, reply_to=msg)
