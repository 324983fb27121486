"""remdr's strategy: a recording and screening layer around the configured Flower strategy.

`build_strategy` turns the run's federation settings into FedAvg, FedProx, FedAdam or a robust
aggregator with a fixed cohort, maybe inside Flower's site-level DP wrapper, and wraps it in
`RemdrStrategy`, which records what every site did each round, refuses malformed updates before
anything aggregates them and applies the missing-site policy. `site_level_privacy` accounts the
DP wrapper's guarantee from the releases actually made.

Site-level DP releases the sum of the clipped updates actually aggregated divided by the round's
fixed cohort size m (the sites asked), plus Gaussian noise of std z*C/m: adding or removing one
site's update moves the release by at most C/m whether other sites replied or were refused, so
the multiplier z holds. A missing or refused site counts as a zero update.

Sites with one modality train only some parts of the model (`remdr.model.model_part`): an
OCT-only hospital has no eye for the fundus branch or the fusion head, and sends them back as
received (`eyes-*` counts in its reply). Each part is aggregated over the sites that trained it,
weighted by the eyes behind it (`_aggregate_parts`), so a part is never pulled towards the
global values by sites without data for it.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from remdr.server.grid import RetryingGrid

from remdr.federation.run_config import FedConfig
from remdr.federation.screening import (
    PART_COUNTS,
    counts_problem,
    trained_counts,
    untrained_part_problem,
    update_problem,
)
from remdr.federation.site_round import RECEIVED
from remdr.model import model_part
from remdr.privacy import epsilon_of

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`


# Per-site only, never averaged: a site's privacy spend (`dp-*`: one site's epsilon averaged with
# another's is no guarantee of anyone; each site's value stays in the round record and in
# report.privacy) and its own test split (`test-*`: reported per site, so nothing selects on it).
PER_SITE_ONLY = ("dp-", "test-", "num-test", RECEIVED)
# Counts summed over the sites, not averaged: the round's training eyes of each kind.
SUMMED = ("eyes-",)


def aggregate_metrics(records: list[RecordDict], weight_key: str) -> MetricRecord:
    """Weighted mean of every metric, ignoring NaN (a site without severe eyes has no severe MAE)
    and the per-site-only keys (`PER_SITE_ONLY`); the `SUMMED` counts add up."""
    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    sums: dict[str, float] = {}
    for rec in records:
        metrics = next(iter(rec.metric_records.values()))
        w = float(metrics[weight_key])
        for k, v in metrics.items():
            if k == weight_key or k.startswith(PER_SITE_ONLY):
                continue
            if k.startswith(SUMMED) and not isinstance(v, list):
                sums[k] = sums.get(k, 0.0) + float(v)
                continue
            if isinstance(v, list) or not math.isfinite(float(v)):
                continue
            totals[k] = totals.get(k, 0.0) + w * float(v)
            weights[k] = weights.get(k, 0.0) + w
    out = {k: totals[k] / weights[k] for k in totals if weights[k] > 0}
    out.update(sums)
    out[weight_key] = sum(float(next(iter(r.metric_records.values()))[weight_key]) for r in records)
    return MetricRecord(out)


# Keys only some sites send (a site's own shipped test split, the model it received scored on
# it): recorded per site above, then dropped from the reply, because Flower refuses to aggregate
# replies whose metric keys differ (InconsistentMessageReplies).
MAY_DIFFER = ("test-", "num-test", f"{RECEIVED}test-", f"{RECEIVED}num-test")


def _drop_site_only_keys(msg: Message) -> None:
    for record in msg.content.metric_records.values():
        for key in [k for k in record if k.startswith(MAY_DIFFER)]:
            del record[key]


PART_WEIGHT = "eyes"  # the weight of one part's own aggregation: the eyes that trained it


def aggregate_part(
    base: Strategy, arrays: list[dict[str, np.ndarray]], eyes: list[float]
) -> dict[str, np.ndarray]:
    """One part of the model aggregated over the sites that trained it (their `arrays` of it,
    the `eyes` each trained it on) by `base`'s own rule, with Flower's own functions: Krum picks
    among them on this part alone; FedMedian and FedTrimmedAvg take the coordinate-wise median
    and trimmed mean (unweighted, as they are); FedAvg, FedProx and FedAdam the eye-weighted
    mean (FedAdam's server step then follows from it)."""
    keys = list(arrays[0])
    if isinstance(base, FedMedian):
        return {k: np.asarray(np.median(np.stack([a[k] for a in arrays]), axis=0)) for k in keys}
    if isinstance(base, FedTrimmedAvg):
        return {k: np.asarray(trim_mean(np.stack([a[k] for a in arrays]), base.beta)) for k in keys}
    contents = [
        RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in a.items()}),
                "metrics": MetricRecord({PART_WEIGHT: float(w)}),
            }
        )
        for a, w in zip(arrays, eyes, strict=True)
    ]
    if isinstance(base, MultiKrum):
        contents = select_multikrum(contents, base.num_malicious_nodes, base.num_nodes_to_select)
    return {k: v.numpy() for k, v in aggregate_arrayrecords(contents, PART_WEIGHT).items()}


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
        # each site's validation of the model it was sent this round (the previous round's
        # model), from the train replies: the ServerApp files it under that round
        self.received: dict[str, dict] = {}
        self._sampled: dict[str, list[int]] = {}
        self._global: dict[str, np.ndarray] = {}
        # called with each site-level DP release the moment it is made, before the model
        # leaves the coordinator (the ServerApp journals it): a crash cannot lose a release
        self.on_release: Callable[[dict], None] | None = None

    def summary(self) -> None:  # noqa: D102
        self.inner.summary()

    # -- state a resumed coordinator needs ---------------------------------------------------

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """(arrays, scalars) that continue this strategy exactly after a restart: a server
        optimiser's moments (FedAdam's m_t, v_t) and the adaptive clipping norm."""
        base = getattr(self.inner, "strategy", self.inner)
        arrays: dict[str, np.ndarray] = {}
        for name in ("m_t", "v_t"):
            for k, v in (getattr(base, name, None) or {}).items():
                arrays[f"{name}/{k}"] = np.asarray(v)
        scalars = {}
        if isinstance(self.inner, DifferentialPrivacyServerSideAdaptiveClipping):
            scalars["clipping_norm"] = float(self.inner.clipping_norm)
        return arrays, scalars

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        base = getattr(self.inner, "strategy", self.inner)
        for name in ("m_t", "v_t"):
            part = {k[len(name) + 1 :]: v for k, v in arrays.items() if k.startswith(f"{name}/")}
            if part:
                setattr(base, name, part)
        if "clipping_norm" in scalars:
            self.inner.clipping_norm = float(scalars["clipping_norm"])

    def _node(self, msg: Message) -> int:
        """The site a reply is about; an error made by the SuperLink names the request's node."""
        dst = self.grid.dst_of_message.get(msg.metadata.reply_to_message_id) if self.grid else None
        return dst if dst is not None else msg.metadata.src_node_id

    def _site(self, msg: Message) -> str:
        node = self._node(msg)
        if msg.has_content() and "site" in msg.content:
            self.site_of_node[node] = str(msg.content["site"]["site-id"])
        return self.site_of_node.get(node, f"node-{node}")

    @staticmethod
    def _metrics(msg: Message) -> MetricRecord:
        return next(iter(msg.content.metric_records.values()))

    @staticmethod
    def _arrays(msg: Message) -> ArrayRecord:
        return next(iter(msg.content.array_records.values()))

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
            metrics = dict(self._metrics(msg))
            scored = {
                k[len(RECEIVED) :]: metrics.pop(k) for k in list(metrics) if k.startswith(RECEIVED)
            }
            if scored:
                self.received[site] = scored
            prefix = "" if phase == "train" else "eval-"
            rec.setdefault(site, {}).update({f"{prefix}{k}": v for k, v in metrics.items()})
            _drop_site_only_keys(msg)
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
            update = {
                k: v.numpy() for rec in msg.content.array_records.values() for k, v in rec.items()
            }
            metrics = self._metrics(msg)
            problem = (
                update_problem(update, self._global, self.fed.max_update_norm)
                or counts_problem(metrics)
                or untrained_part_problem(update, self._global, trained_counts(metrics))
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
        if hasattr(self.inner, "num_sampled_clients"):  # the cohort m; see `_release`
            self.inner.num_sampled_clients = have

    def take_received(self) -> tuple[dict, dict[str, dict]] | None:
        """(aggregate, per-site `eval-*` metrics) of the previous round's model as the sites
        scored it before training this round; None when no site sent them. Clears them."""
        if not self.received:
            return None
        per_site = {s: {f"eval-{k}": v for k, v in m.items()} for s, m in self.received.items()}
        records = [
            RecordDict({"metrics": MetricRecord({**m, "num-examples": m.get("num-val", 0)})})
            for m in self.received.values()
        ]
        self.received = {}
        return dict(aggregate_metrics(records, "num-examples")), per_site

    def final_evaluation(self, arrays: ArrayRecord, config, server_round: int):
        """One evaluate message per site for the last round's model (in one-message rounds no
        train reply ever scores it): (aggregate, per-site `eval-*` metrics), or None."""
        base = getattr(self.inner, "strategy", self.inner)
        base.fraction_evaluate = 1.0
        self.current = {"round": server_round + self.round_offset}
        msgs = self.configure_evaluate(server_round, arrays, config, self.grid)
        replies = self.grid.send_and_receive(msgs, timeout=self.fed.round_timeout)
        if self.aggregate_evaluate(server_round, replies) is None:
            return None
        per_site = {
            s: {k: v for k, v in m.items() if k.startswith("eval-")}
            for s, m in self.current.get("sites", {}).items()
        }
        return self.current["evaluate"], per_site

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
        own = self._aggregate_parts(good)
        private = isinstance(self.inner, DP_WRAPPERS)
        if private:  # the wrapper's noise z*C/k on the mean of the k updates it gets
            self.inner.num_sampled_clients = len(good)
            clip = float(self.inner.clipping_norm)
        arrays, metrics = self.inner.aggregate_train(server_round + self.round_offset, good)
        if own and arrays is not None and not isinstance(self.inner, FedOpt):
            # the inner rule over equal arrays gives them up to rounding: give them exactly
            # (FedAdam instead took its server step towards them)
            for key, value in own.items():
                arrays[key] = Array(np.asarray(value, order="C"))
        self.current["train"] = dict(metrics) if metrics is not None else {}
        self.current["aggregated"] = sorted(self._site(m) for m in good)
        if private and arrays is not None:
            arrays = self._release(arrays, len(good), clip)
        return arrays, metrics

    def _aggregate_parts(self, replies: list[Message]) -> dict[str, np.ndarray]:
        """Aggregate each part of the model over the sites that trained it, weighted by the eyes
        behind it (`eyes-*`; the shared part by num-examples, as always); return those parts.

        A part gets its own aggregate (`aggregate_part`) only where the ordinary one would differ:
        some site did not train it or, for a weighted rule, trained it on fewer eyes than it
        has. The aggregate is written into every reply, so the inner strategy's mean (FedAvg,
        FedProx) is that aggregate, FedAdam takes its server step towards it, and the robust
        rules see the part as its trainers agreed on it; a part no site trained stays global.
        A complete federation is aggregated as before, bit for bit. Under site-level DP this is
        refused: its noise is calibrated to one plain mean of every site's update, and there an
        untrained part counts as a zero update.
        """
        if any(key in self._metrics(m) for m in replies for key in PART_COUNTS.values()):
            for m in replies:  # an older site trained every part on all its eyes; Flower
                metrics = self._metrics(m)  # aggregates only replies with the same metrics
                for key in PART_COUNTS.values():
                    if key not in metrics:
                        metrics[key] = metrics["num-examples"]
        base = getattr(self.inner, "strategy", self.inner)
        private = isinstance(self.inner, DP_WRAPPERS)
        weighted = not (private or isinstance(base, FedMedian | FedTrimmedAvg | MultiKrum))
        counts = [trained_counts(self._metrics(m)) for m in replies]
        own = []
        for part in PART_COUNTS:
            keys = [k for k in self._global if model_part(k) == part]
            if weighted:
                differs = any(c[part] != c["shared"] for c in counts)
            else:
                differs = any(c[part] == 0 for c in counts)
            if keys and differs:
                own.append((part, keys))
        if not own:
            return {}
        if private:
            trained = ", ".join(
                f"{part} by {sum(c[part] > 0 for c in counts)} of {len(counts)}" for part, _ in own
            )
            reason = (
                f"sites trained different parts of the model ({trained} sites), but site-level "
                "DP needs one plain mean of every site's update: a site's untrained part counts "
                "as a zero update, not aggregated over its trainers only"
            )
            self.current["part-aggregation"] = {"refused": reason}
            log.error(
                "round %s: per-part aggregation refused: %s", self.current.get("round"), reason
            )
            return {}
        out: dict[str, np.ndarray] = {}
        record = self.current.setdefault("part-aggregation", {})
        for part, keys in own:
            trainers = [(m, c[part]) for m, c in zip(replies, counts, strict=True) if c[part] > 0]
            if trainers:
                arrays = [{k: self._arrays(m)[k].numpy() for k in keys} for m, _ in trainers]
                aggregate = aggregate_part(base, arrays, [eyes for _, eyes in trainers])
            else:
                aggregate = {k: self._global[k] for k in keys}
            for m in replies:
                rec = self._arrays(m)
                for k in keys:
                    rec[k] = Array(np.asarray(aggregate[k], order="C"))
            out.update(aggregate)
            record[part] = sorted(self._site(m) for m, _ in trainers)
        return out

    def _release(self, arrays, k: int, clip: float):
        """Rescale the wrapper's g + mean_k + N(0, (zC/k)^2) to g + sum_k/m + N(0, (zC/m)^2),
        with m the round's cohort (the sites asked): the release has sensitivity C/m and
        multiplier z however many replied or passed screening. Record and journal it."""
        m = max(len(self._sampled.get("train", [])), k)
        if k < m:
            scaled = {}
            for key, array in arrays.items():
                a, g = array.numpy(), self._global[key].astype(np.float64)
                scaled[key] = Array((g + (a.astype(np.float64) - g) * (k / m)).astype(a.dtype))
            arrays = ArrayRecord(scaled)
            log.warning(
                "round %s: site-level DP over %d of %d sites; missing or refused sites count "
                "as zero updates (the release is the sum over m=%d)", self.current["round"], k, m, m,
            )  # fmt: skip
        z = float(self.inner.noise_multiplier)
        release = {
            "round": self.current.get("round"),
            "cohort": m,
            "aggregated": k,
            "noise_multiplier": z,
            "clip": clip,
            "noise_std": z * clip / m,
        }
        if isinstance(self.inner, DifferentialPrivacyServerSideAdaptiveClipping):
            release["count_noise"] = float(self.inner.clipped_count_stddev)
        self.current["site_dp_release"] = release
        if self.on_release is not None:
            self.on_release(release)
        return arrays

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


class ServerSideAdaptiveClipping(DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noised with the norm the updates were clipped to.

    Flower 1.42 moves the clipping norm (`_geometric_update`) before it adds the noise, so a
    shrinking norm under-noises the release (std z*C_next/m for updates clipped to C). Here the
    next norm takes effect only after the release."""

    _next_norm: float | None = None

    def _geometric_update(self, clipped_fraction: float) -> None:
        used = self.clipping_norm
        super()._geometric_update(clipped_fraction)
        self._next_norm, self.clipping_norm = self.clipping_norm, used

    def aggregate_train(self, server_round, replies):  # noqa: D102
        self._next_norm = None
        out = super().aggregate_train(server_round, replies)
        if self._next_norm is not None:
            self.clipping_norm = self._next_norm
        return out


DP_WRAPPERS = (
    DifferentialPrivacyServerSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
)

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
        "fraction_evaluate": 1.0 if fed.separate_evaluate else 0.0,
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
        inner = ServerSideAdaptiveClipping(
            inner, fed.site_dp_noise, fed.min_nodes, initial_clipping_norm=fed.site_dp_clip
        )
    return RemdrStrategy(inner, fed)


def site_level_privacy(fed: FedConfig, releases: list[dict]) -> dict | None:
    """(epsilon, delta) of the site-level guarantee after the noised aggregates in `releases`
    (the journal: one entry per release made, as `RemdrStrategy` recorded it).

    Every site joins every round (q = 1, no amplification): each release is a Gaussian
    mechanism with multiplier z on the sum of clipped updates over the fixed cohort m (std
    z*C/m on the released mean), composed with Opacus' RDP. Adaptive clipping also releases a
    noisy count of clipped updates (sensitivity 1, std `count_noise`), accounted as a second
    Gaussian mechanism per release.
    """
    if fed.site_dp == "off":
        return None
    history = [(float(r["noise_multiplier"]), 1.0, 1) for r in releases]
    history += [(float(r["count_noise"]), 1.0, 1) for r in releases if "count_noise" in r]
    return {
        "granularity": "site-level: add or remove one site's whole update in a round",
        "mechanism": (
            f"Flower server-side {fed.site_dp} clipping; the sum of the clipped updates over the "
            "round's cohort m (a missing or refused site counts as zero), noise z*C/m on the mean"
        ),
        "noise_multiplier": fed.site_dp_noise,
        "clip": fed.site_dp_clip if fed.site_dp == "fixed" else f"adaptive from {fed.site_dp_clip}",
        "releases": len(releases),
        "delta": fed.site_dp_delta,
        "epsilon": epsilon_of(history, fed.site_dp_delta),
    }
