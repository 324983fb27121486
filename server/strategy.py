"""remdr's strategy: a recording and screening layer around the configured Flower strategy.

`build_strategy` turns the run's federation settings into FedAvg, FedProx, FedAdam or a robust
aggregator with a fixed cohort, maybe inside Flower's site-level DP wrapper, and wraps it in
`RemdrStrategy`, which records what every site did each round, refuses malformed updates before
anything aggregates them and applies the missing-site policy. `site_level_privacy` accounts the
DP wrapper's guarantee.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable

import numpy as np
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from remdr.server.grid import RetryingGrid

from remdr.federation.run_config import FedConfig
from remdr.federation.screening import update_problem
from remdr.privacy import epsilon_of

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric, ignoring NaN (a site without severe eyes has no severe MAE)."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for rec in records:
        metrics = next(iter(rec.metric_records.values()))
        w = float(metrics[weight_key])
        for k, v in metrics.items():
            if k == weight_key or isinstance(v, list) or not math.isfinite(float(v)):
                continue
            totals[k] = totals.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    out = {k: totals[k] / weights[k] for k in totals if weights[k] > 0}
    out[weight_key] = sum(float(next(iter(r.metric_records.values()))[weight_key]) for r in records)
    return MetricRecord(out)


class RoundAborted(RuntimeError):
    """A sampled site did not reply and the run's policy is on-missing=abort."""


class RemdrStrategy(Strategy):
    """The outermost layer around a Flower strategy (itself maybe DP-wrapped).

    It records what every site did each round (metrics, errors, missing sites), rejects
    malformed updates before anything aggregates them, applies the missing-site policy, and
    shifts round numbers by `round_offset` when a run resumes.
    """

    def __init__(self, inner: Strategy, fed: FedConfig) -> None:
        self.inner, self.fed = inner, fed
        self.round_offset = 0
        self.grid: RetryingGrid | None = None
        self.site_of_node: dict[int, str] = {}
        self.current: dict = {}
        self._sampled: dict[str, list[int]] = {}
        self._global: dict[str, np.ndarray] = {}

    def summary(self) -> None:  # noqa: D102
        self.inner.summary()

    def _node(self, msg: Message) -> int:
        """The site a reply is about; an error made by the SuperLink names the request's node."""
        dst = self.grid.dst_of_message.get(msg.metadata.reply_to_message_id) if self.grid else None
        return dst if dst is not None else msg.metadata.src_node_id

    def _site(self, msg: Message) -> str:
        node = self._node(msg)
        if msg.has_content() and "site" in msg.content:
            self.site_of_node[node] = str(msg.content["site"]["site-id"])
        return self.site_of_node.get(node, f"node-{node}")

    def _error(self, site: str, phase: str, reason: str) -> None:
        self.current.setdefault("errors", []).append(
            {"site": site, "phase": phase, "reason": reason}
        )
        log.warning("site %s failed in %s: %s", site, phase, reason)

    def _note(self, phase: str, replies: list[Message]) -> list[Message]:
        """Record replies; return the ones with content."""
        replied = {self._node(m) for m in replies}
        rec = self.current.setdefault("sites", {})
        good = []
        for msg in replies:
            site = self._site(msg)
            if msg.has_error():
                self._error(site, phase, msg.error.reason)
                continue
            metrics = dict(next(iter(msg.content.metric_records.values())))
            prefix = "" if phase == "train" else "eval-"
            rec.setdefault(site, {}).update({f"{prefix}{k}": v for k, v in metrics.items()})
            good.append(msg)
        sampled = self._sampled.get(phase, [])
        missing = [self.site_of_node.get(n, f"node-{n}") for n in sampled if n not in replied]
        if missing:
            self.current.setdefault("missing", {})[phase] = missing
            log.warning(
                "round %s %s: no reply from %s", self.current.get("round"), phase,
                ", ".join(missing),
            )  # fmt: skip
            if self.fed.on_missing == "abort":
                raise RoundAborted(
                    f"round {self.current.get('round')} {phase}: no reply from "
                    f"{', '.join(missing)} (on-missing=abort)"
                )
        return good

    def _screen(self, replies: list[Message]) -> list[Message]:
        """Drop updates that cannot be aggregated; name the site in the log and report."""
        kept = []
        for msg in replies:
            update = {k: v for rec in msg.content.array_records.values() for k, v in rec.items()}
            problem = update_problem(
                {k: v.numpy() for k, v in update.items()}, self._global, self.fed.max_update_norm
            )
            if problem:
                site = self._site(msg)
                self.current.setdefault("rejected", []).append(site)
                self._error(site, "train", f"update rejected: {problem}")
            else:
                kept.append(msg)
        return kept

    def _cohort(self, grid) -> None:
        """Wait up to `node-wait` for all `min-nodes` sites; then go on with those connected
        (on-missing=continue) or stop the run (abort). Flower alone would wait forever."""
        want = self.fed.min_nodes
        deadline = time.monotonic() + self.fed.node_wait
        while len(nodes := list(grid.get_node_ids())) < want and time.monotonic() < deadline:
            time.sleep(1.0)
        have = max(1, min(want, len(nodes)))
        if have < want:
            connected = set(nodes)
            gone = sorted(site for node, site in self.site_of_node.items() if node not in connected)
            self.current.setdefault("missing", {})["connect"] = gone or [f"{want - have} site(s)"]
            note = f"{len(nodes)} of {want} sites connected after {self.fed.node_wait:.0f}s"
            if self.fed.on_missing == "abort":
                raise RoundAborted(f"round {self.current['round']}: {note} (on-missing=abort)")
            log.warning("round %s: %s; continuing without %s", self.current["round"], note,
                        ", ".join(gone) or "them")  # fmt: skip
        base = getattr(self.inner, "strategy", self.inner)  # under a DP wrapper
        base.min_train_nodes = base.min_evaluate_nodes = base.min_available_nodes = have
        if hasattr(self.inner, "num_sampled_clients"):  # DP noise zC/m must use the real m
            self.inner.num_sampled_clients = have

    def configure_train(self, server_round, arrays, config, grid):  # noqa: D102
        self.current = {"round": server_round + self.round_offset, "started": time.time()}
        self._cohort(grid)
        self._global = {k: v.numpy() for k, v in arrays.items()}
        msgs = list(
            self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        self._sampled["train"] = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def aggregate_train(self, server_round, replies: Iterable[Message]):  # noqa: D102
        good = self._screen(self._note("train", list(replies)))
        if not good:
            log.warning("round %s: no usable update; the global model is kept", server_round)
            self.current["train"] = {}
            return None, None
        arrays, metrics = self.inner.aggregate_train(server_round + self.round_offset, good)
        self.current["train"] = dict(metrics) if metrics is not None else {}
        self.current["aggregated"] = sorted(self._site(m) for m in good)
        return arrays, metrics

    def configure_evaluate(self, server_round, arrays, config, grid):  # noqa: D102
        self._cohort(grid)  # a site may have gone since training started
        msgs = list(
            self.inner.configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        )
        self._sampled["evaluate"] = [m.metadata.dst_node_id for m in msgs]
        return msgs

    def aggregate_evaluate(self, server_round, replies: Iterable[Message]):  # noqa: D102
        good = self._note("evaluate", list(replies))
        metrics = (
            self.inner.aggregate_evaluate(server_round + self.round_offset, good) if good else None
        )
        self.current["evaluate"] = dict(metrics) if metrics is not None else {}
        return metrics


BASES = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedadam": FedAdam,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}


def build_strategy(fed: FedConfig) -> RemdrStrategy:
    """The configured Flower strategy with a fixed cohort of `min-nodes` sites per round,
    wrapped in Flower's site-level DP when asked, inside remdr's recording/screening layer."""
    base = BASES[fed.strategy]
    kwargs = {
        "fraction_train": fed.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": fed.min_nodes,
        "min_evaluate_nodes": fed.min_nodes,
        "min_available_nodes": fed.min_nodes,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    if fed.site_dp != "off":
        kwargs["weighted_by_key"] = "unit-weight"  # a plain mean: the DP sensitivity is C/m
    if fed.strategy == "fedprox":
        kwargs["proximal_mu"] = fed.proximal_mu
    elif fed.strategy == "fedadam":
        kwargs.update(
            eta=fed.server_lr,
            beta_1=fed.server_beta_1,
            beta_2=fed.server_beta_2,
            tau=fed.server_tau,
        )
    elif fed.strategy == "fedtrimmedavg":
        kwargs["beta"] = fed.trim_beta
    inner: Strategy = base(**kwargs)
    if fed.site_dp == "fixed":
        inner = DifferentialPrivacyServerSideFixedClipping(
            inner, fed.site_dp_noise, fed.site_dp_clip, fed.min_nodes
        )
    elif fed.site_dp == "adaptive":
        inner = DifferentialPrivacyServerSideAdaptiveClipping(
            inner, fed.site_dp_noise, fed.min_nodes, initial_clipping_norm=fed.site_dp_clip
        )
    return RemdrStrategy(inner, fed)


def site_level_privacy(fed: FedConfig, releases: int) -> dict | None:
    """(epsilon, delta) of the site-level guarantee after `releases` noised aggregates.

    Every site joins every round (q = 1, no amplification): each release is a Gaussian
    mechanism with multiplier z on the mean of clipped updates, composed with Opacus' RDP.
    """
    if fed.site_dp == "off":
        return None
    return {
        "granularity": "site-level: add or remove one site's whole update in a round",
        "mechanism": f"Flower server-side {fed.site_dp} clipping, noise z*C/m on the mean",
        "noise_multiplier": fed.site_dp_noise,
        "clip": fed.site_dp_clip,
        "releases": releases,
        "delta": fed.site_dp_delta,
        "epsilon": epsilon_of([(fed.site_dp_noise, 1.0, releases)], fed.site_dp_delta),
    }
