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
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from remdr.client.app import PRIVACY_DECLINED, SITE_ERROR, VERSION_MISMATCH
from remdr.client.metrics_policy import REQUEST_KEY, agreed_level, bin_patients, share_metrics
from remdr.client.site_policy import SitePolicy

from remdr import __version__
from remdr.config import ExperimentConfig
from remdr.data.loading import data_stamp
from remdr.data.splits import site_split_key
from remdr.errors import PrivacyError, RemdrError
from remdr.federation.run_config import FedConfig, split_run_config, versions_compatible
from remdr.federation.site_round import (
    SiteData,
    evaluate_global,
    head_statistics,
    load_site,
    train_round,
)
from remdr.federation.site_state import (
    Carried,
    SiteState,
    flatten_optimizer,
    unflatten_optimizer,
)
from remdr.head_refit import HEAD_STATS, TASK_KEY
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


@dataclass
class Setup:
    """A message's run config under the site's policy, and the site's data."""

    cfg: ExperimentConfig  # privacy: the site's ledger, ceiling and delta
    fed: FedConfig
    site: SiteData
    policy: SitePolicy
    metrics_level: str  # what this site shares this run (remdr.client.metrics_policy)

    def shared(self, metrics: dict[str, float]) -> dict[str, float]:
        splits = {"val": self.site.val.records, "test": self.site.test.records}
        return share_metrics(
            metrics, self.metrics_level, bin_patients(splits), self.policy.min_bin_patients
        )


def _setup(msg: Message, context: Context) -> Setup | Message:
    """Check version, config and the site's policy, load the site's data; or an error reply.
    The policy's refusals come before the data is read."""
    config = msg.content["config"] if "config" in msg.content else ConfigRecord()
    server_version = str(config.get("remdr-version", __version__))
    if not versions_compatible(server_version):
        reason = f"site {_site_id(context)} runs remdr {__version__}, the server {server_version}: install a matching version"
        return Message(Error(code=VERSION_MISMATCH, reason=reason), reply_to=msg)
    try:
        policy = SitePolicy.from_node_config(dict(context.node_config))
        run_config = dict(context.run_config)
        # the site reads the coordinator's metrics request itself (FedConfig need not know it)
        level = agreed_level(policy.metrics_level, str(run_config.pop(REQUEST_KEY, "auto")))
        cfg, fed = split_run_config(run_config)
        if policy.require_dp and not get_spec(cfg.train.method).private:
            raise PrivacyError(
                f"method {cfg.train.method} declined",
                "this site only trains under DP-SGD (require-dp)",
                "ask the coordinator for a private method such as remdr_dp",
            )
        data_path = _data_path(context, fed.sim_data_root)
        site = _load_site(data_path, cfg, context, split_key(context.node_config))
        patients = len({r.patient_id for r in site.dataset.records})
        cfg = _site_privacy(cfg, fed, context, policy, patients)
    except RemdrError as err:
        return _site_error(msg, context, err)
    return Setup(cfg, fed, site, policy, level)


def split_key(node_config) -> bytes:
    """The site's key for drawing its validation patients (`split_by_key`): a random secret
    kept beside its ledger (`<ledger>-site-state/split-key`, made once, 0600), so neither the
    coordinator's seed nor a patient added later changes who trains; a site without a ledger of
    its own (a simulated one) uses a key derived from its site id (`site_split_key`),
    reproducible and not secret."""
    ledger = str(node_config.get("ledger", ""))
    if not ledger:  # named as `_site_id` names it: a virtual node k is site-k
        site = node_config.get("site-id") or f"site-{node_config.get('partition-id', '')}"
        return site_split_key(str(site))
    path = Path(ledger).expanduser()
    path = path.parent / f"{path.stem}-site-state" / "split-key"
    try:
        if not path.is_file():
            _make_key(path)
        key = path.read_bytes()
    except OSError as err:
        raise PrivacyError(
            f"the site's split key {path} cannot be made or read",
            err.strerror or type(err).__name__,
            "let remdr-client's user write beside the ledger",
        ) from None
    if len(key) != 32:
        raise PrivacyError(
            f"the site's split key {path} is damaged",
            "it decides which patients train",
            "restore it from backup (deleting it reshuffles who trains)",
        )
    return key


def _make_key(path: Path) -> None:
    """32 random bytes at `path` (0600), written whole before anyone can read them; of two
    sites' processes making it at once, the first wins and both use its key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"split-key.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


# Simulation workers (Ray actors) run many messages in one process: a virtual site's data is
# loaded once per worker. Deployment starts a process per message, so there the site's disk
# cache of decoded tensors (`load_site(cache=True)`) is what saves the work. A virtual site keeps
# that cache beside its data (`<sim-data-root>/cache`), where any Ray node that serves it next
# finds it, not under the serving node's own REMDR_CACHE.
_SIM_SITES: dict[tuple, SiteData] = {}
# The site worker (`remdr-client start`) runs every message in one process too: it keeps its
# last scan of the site's folder while no file in it changed (the scan opens every file: 0.8 s
# of a 2.2 s round message at a 482-eye site). One entry per folder.
_DEPLOYED: dict[str, tuple[tuple, SiteData]] = {}


def _load_site(data_path: str, cfg, context: Context, key: bytes) -> SiteData:
    memo = (data_path, key, json.dumps(dataclasses.asdict(cfg.data), sort_keys=True))
    if "partition-id" not in context.node_config:
        stamp = (memo, data_stamp(data_path))
        kept = _DEPLOYED.get(data_path)
        if kept is None or kept[0] != stamp:
            site = load_site(data_path, cfg, seed=cfg.train.seed, cache=True, split_key=key)
            kept = _DEPLOYED[data_path] = (stamp, site)
        return kept[1]
    if memo not in _SIM_SITES:
        from remdr.data.preprocessed import warm

        site = load_site(data_path, cfg, seed=cfg.train.seed, split_key=key)
        name, root = str(Path(data_path).resolve()), Path(data_path).parent / "cache"
        warm([site.train, site.val, site.test], cfg.data, name=name, root=root)
        _SIM_SITES[memo] = site
    return _SIM_SITES[memo]


def _placement(context: Context) -> dict[str, list[int]]:
    """Simulation only: the Ray node and process that ran this message (`sim-ray-node`: the
    node id's first 8 hex digits as an integer, and the pid), so a run on a Ray cluster shows
    where each site trained. A list, so the coordinator records it per site, never averages it."""
    ray = sys.modules.get("ray")  # loaded by the Ray worker that runs this ClientApp
    if "partition-id" not in context.node_config or ray is None or not ray.is_initialized():
        return {}
    return {"sim-ray-node": [int(ray.get_runtime_context().get_node_id()[:8], 16), os.getpid()]}


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

    def begin(self, message: str) -> None:
        """No journal: a site without a ledger trains no private method, so a message handled
        twice spends no privacy budget."""

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


def _site_privacy(cfg, fed, context: Context, policy: SitePolicy, patients: int):
    """The site's own privacy policy over the run config: its ledger; a ceiling and a delta
    the run config can lower, never raise."""
    ledger = _ledger(context, fed)
    if get_spec(cfg.train.method).private and not ledger:
        raise PrivacyError("no privacy ledger configured", "", "start remdr-client with --ledger")
    privacy = dataclasses.replace(
        cfg.privacy,
        dp_ledger=ledger,
        dp_epsilon_max=min(policy.epsilon_max, cfg.privacy.dp_epsilon_max),
        dp_delta=min(policy.site_delta(patients), cfg.privacy.dp_delta),
    )
    return dataclasses.replace(cfg, privacy=privacy)


def _site_record(context: Context) -> ConfigRecord:
    return ConfigRecord({"site-id": _site_id(context), "remdr-version": __version__})


def train(msg: Message, context: Context) -> Message:
    setup = _setup(msg, context)
    if isinstance(setup, Message):
        return setup
    server_round = int(msg.content["config"].get("server-round", 1))
    server_control = (
        msg.content["control"].to_torch_state_dict() if "control" in msg.content else None
    )
    try:
        store = _site_state(msg, context, setup.fed)
        store.begin(f"{context.run_id}/{msg.metadata.message_id}")  # never trained twice
        result = train_round(
            setup.cfg,
            setup.fed,
            msg.content["arrays"].to_torch_state_dict(),
            setup.site,
            server_round=server_round,
            carried=store.load(before=server_round),
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
            "metrics": MetricRecord({**setup.shared(result.metrics), **_placement(context)}),
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
    try:
        local = None
        if setup.fed.fedbn:  # the layers this site's latest training left, this round included
            server_round = int(msg.content["config"].get("server-round", 1))
            local = _site_state(msg, context, setup.fed).load(before=server_round + 1).local
        global_state = msg.content["arrays"].to_torch_state_dict()
        if msg.content["config"].get(TASK_KEY) == HEAD_STATS:
            return _head_statistics(msg, context, setup, global_state, local)
        metrics = evaluate_global(setup.cfg, global_state, setup.site, local)
    except RemdrError as err:
        log.warning("site %s: %s", _site_id(context), err)
        return _site_error(msg, context, err)
    metrics["num-examples"] = metrics["num-val"]
    metrics["unit-weight"] = 1.0
    shared = MetricRecord(setup.shared(metrics))
    content = RecordDict({"metrics": shared, "site": _site_record(context)})
    return Message(content=content, reply_to=msg)


def _head_statistics(msg: Message, context: Context, setup: Setup, global_state, local) -> Message:
    """`head-refit`: the sums of this site's eyes the coordinator refits the fusion head's
    output layer from (`remdr.head_refit`), in the reply's one ArrayRecord (`arrays`, the
    record the site worker's link carries), screened there like weights."""
    arrays = head_statistics(setup.cfg, global_state, setup.site, local)
    metrics = {  # every eye, as a train reply counts them; the sums are of the complete ones
        "num-examples": float(len(setup.site.train)),
        "num-val": float(len(setup.site.val)),
        "unit-weight": 1.0,
    }
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()}),
            "metrics": MetricRecord(metrics),
            "site": _site_record(context),
        }
    )
    return Message(content=content, reply_to=msg)
