"""remdr's strategy: a recording and screening layer around the configured Flower strategy.

`build_strategy` turns the run's federation settings into FedAvg, FedProx, FedAdam or a robust
aggregator with a fixed cohort, maybe inside Flower's site-level DP wrapper (`site_dp`), and
wraps it in `RemdrStrategy`, which records what every site did each round, refuses malformed
replies (`reply_screening`), names that belong to another node (`site_names`) and bad updates
(`remdr.federation.screening`) before anything aggregates them, aggregates each part of the
model over the sites that trained it (`part_aggregation`), releases only a finite global model
in the model's own dtypes (`global_model`) and applies the missing-site policy. The metrics of
the replies are combined by `reply_metrics`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from functools import reduce

import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    Krum,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from remdr.server.drift_control import ServerControl
from remdr.server.global_model import released
from remdr.server.grid import RetryingGrid
from remdr.server.part_aggregation import ServerMoments, aggregate_parts, arrays_of, untrained_keys
from remdr.server.reply_metrics import (
    aggregate_metrics,
    drop_site_only_keys,
    metrics_of,
    received_scores,
)
from remdr.server.reply_screening import SiteCounts, consistent_metrics, shape_problem, site_id
from remdr.server.site_dp import DP_WRAPPERS, over_cohort, release_record, wrap
from remdr.server.site_names import SiteNames

from remdr.federation.run_config import FedConfig
from remdr.federation.screening import (
    counts_problem,
    head_stats_problem,
    trained_counts,
    untrained_part_problem,
    update_problem,
)
from remdr.federation.site_round import RECEIVED
from remdr.head_refit import HEAD_STATS, SPLITS, Sums, add, from_arrays

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`


class RoundAborted(RuntimeError):
    """A sampled site did not reply and the run's policy is on-missing=abort."""


class RemdrStrategy(Strategy):
    """The outermost layer around a Flower strategy (itself maybe DP-wrapped).

    It records what every site did each round (metrics, errors, missing sites), refuses
    malformed replies, borrowed names and bad updates before anything aggregates them, applies
    the missing-site policy, and shifts round numbers by `round_offset` when a run resumes.
    """

    def __init__(
        self,
        inner: Strategy,
        fed: FedConfig,
        parameters: dict[str, tuple[int, ...]] | None = None,
    ) -> None:
        self.inner, self.fed = inner, fed
        # SCAFFOLD's c over the model's trainable `parameters` (name -> shape)
        self.control = ServerControl(parameters or {}) if fed.drift_control == "scaffold" else None
        self._deltas: dict[str, dict[str, np.ndarray] | None] = {}
        self.round_offset = 0
        self.grid: RetryingGrid | None = None
        self.names = SiteNames()  # which node speaks for which site
        weight = "unit-weight" if fed.site_dp != "off" else "num-examples"
        self.counts = SiteCounts(fed.max_site_examples, weight_key=weight)
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
        optimiser's moments (FedAdam's m_t, v_t), the adaptive clipping norm, which node speaks
        for which site and the counts each site first reported (they bound its later ones)."""
        arrays = ServerMoments.state_of(getattr(self.inner, "strategy", self.inner))
        if self.control is not None:
            arrays.update(self.control.state_dict())
        scalars: dict = {"site-nodes": self.names.state_dict()}
        scalars["site-counts"] = self.counts.state_dict()
        if isinstance(self.inner, DifferentialPrivacyServerSideAdaptiveClipping):
            scalars["clipping_norm"] = float(self.inner.clipping_norm)
        return arrays, scalars

    def load_state_dict(self, arrays: dict[str, np.ndarray], scalars: dict) -> None:
        ServerMoments.load(getattr(self.inner, "strategy", self.inner), arrays)
        if "clipping_norm" in scalars:
            self.inner.clipping_norm = float(scalars["clipping_norm"])
        self.names.load_state_dict(scalars.get("site-nodes", {}))
        self.counts.load_state_dict(scalars.get("site-counts", {}))
        if self.control is not None:
            self.control.load_state_dict(arrays)

    def _node(self, msg: Message) -> int:
        """The site a reply is about; an error made by the SuperLink names the request's node."""
        dst = self.grid.dst_of_message.get(msg.metadata.reply_to_message_id) if self.grid else None
        return dst if dst is not None else msg.metadata.src_node_id

    def _site(self, msg: Message) -> str:
        """The site a reply speaks for (its node's bound name), or `node-<id>`."""
        return self.names.label(self._node(msg))

    def _refuse(self, msg: Message, phase: str) -> str | None:
        """Why a reply is refused before anything reads it (`reply_screening`): its shape, the
        site it claims (`site_names`), its counts and metrics; None if it may be read."""
        problem = shape_problem(msg, phase, control=phase == "train" and self.control is not None)
        if problem:
            return problem
        problem, moved = self.names.claim(self._node(msg), site_id(msg))
        if moved:
            self.current.setdefault("rebound", {})[site_id(msg)] = list(moved)
        return problem or self.counts.problem(self._site(msg), metrics_of(msg), phase)

    def _error(self, site: str, phase: str, reason: str, *, rejected: bool = False) -> None:
        """Name a failed or (`rejected`) refused site in the round record and the log."""
        if rejected:
            self.current.setdefault("rejected", []).append(site)
        error = {"site": site, "phase": phase, "reason": reason}
        self.current.setdefault("errors", []).append(error)
        log.warning("site %s failed in %s: %s", site, phase, reason)

    def _note(self, phase: str, replies: list[Message]) -> list[Message]:
        """Record replies; return the ones with content."""
        replied = {self._node(m) for m in replies}
        rec = self.current.setdefault("sites", {})
        good = []
        for msg in replies:
            if msg.has_error():
                self._error(self._site(msg), phase, msg.error.reason)
                continue
            problem = self._refuse(msg, phase)
            site = self._site(msg)
            if problem:
                self._error(site, phase, f"reply rejected: {problem}", rejected=True)
                continue
            metrics = dict(metrics_of(msg))
            scored = {
                k[len(RECEIVED) :]: metrics.pop(k) for k in list(metrics) if k.startswith(RECEIVED)
            }
            if scored:
                self.received[site] = scored
            prefix = "" if phase == "train" else "eval-"
            rec.setdefault(site, {}).update({f"{prefix}{k}": v for k, v in metrics.items()})
            drop_site_only_keys(msg)
            good.append(msg)
        missing = [self.names.label(n) for n in self._sampled.get(phase, []) if n not in replied]
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
        self._deltas = {}
        for msg in replies:
            delta = ServerControl.take(msg) if self.control is not None else None
            update = {k: v.numpy() for k, v in arrays_of(msg).items()}  # its one ArrayRecord
            metrics = metrics_of(msg)
            limit = self.fed.max_update_norm
            problem = (
                update_problem(update, self._global, limit)
                or counts_problem(metrics)
                or untrained_part_problem(update, self._global, trained_counts(metrics))
                or (self.control.problem(delta, limit) if self.control is not None else None)
            )
            self._deltas[msg.metadata.message_id] = delta
            if problem:
                self._error(self._site(msg), "train", f"update rejected: {problem}", rejected=True)
                self.received.pop(self._site(msg), None)  # nothing of it counts
            else:
                self.counts.commit(self._site(msg), metrics, "train")
                kept.append(msg)
        return kept

    def _cohort(self, grid) -> None:
        """Wait up to `node-wait` for all `min-nodes` sites; then go on with those connected
        (on-missing=continue) or stop the run (abort). Flower alone would wait forever."""
        want = self.fed.min_nodes
        deadline = time.monotonic() + self.fed.node_wait
        while len(nodes := list(grid.get_node_ids())) < want and time.monotonic() < deadline:
            time.sleep(1.0)
        self.names.learn(grid)
        have = max(1, min(want, len(nodes)))
        if have < want:
            connected = set(nodes)
            gone = sorted(
                site for node, site in self.names.of_node.items() if node not in connected
            )
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
        scored it before training this round (`reply_metrics.received_scores`); None when no
        site sent them. Clears them."""
        received, self.received = self.received, {}
        return received_scores(received) if received else None

    def _ask_every_site(self, arrays: ArrayRecord, config, server_round: int) -> list[Message]:
        """One evaluate message per site of the cohort, outside Flower's rounds; their replies."""
        base = getattr(self.inner, "strategy", self.inner)
        base.fraction_evaluate = 1.0
        self.current = {"round": server_round + self.round_offset}
        msgs = self.configure_evaluate(server_round, arrays, config, self.grid)
        return self.grid.send_and_receive(msgs, timeout=self.fed.round_timeout)

    def final_evaluation(self, arrays: ArrayRecord, config, server_round: int):
        """One evaluate message per site for the last round's model (in one-message rounds no
        train reply ever scores it): (aggregate, per-site `eval-*` metrics), or None."""
        replies = self._ask_every_site(arrays, config, server_round)
        if self.aggregate_evaluate(server_round, replies) is None:
            return None
        per_site = {
            s: {k: v for k, v in m.items() if k.startswith("eval-")}
            for s, m in self.current.get("sites", {}).items()
        }
        return self.current["evaluate"], per_site

    def head_statistics(
        self, arrays: ArrayRecord, config, server_round: int, sizes: dict[str, int]
    ) -> tuple[Sums, Sums, list[str], list[dict]] | None:
        """`head-refit`: one evaluate message per site for the chosen model, whose replies carry
        the sites' sums (`remdr.head_refit`; `sizes`: each head's Gram size); (train, val, the
        sites summed, the errors), or None when no site's sums passed screening. Each reply is
        screened like an update: its shape, its site name, its counts (bounded by the site's
        first), then the sums themselves."""
        replies = self._ask_every_site(arrays, config, server_round)
        sums: list[tuple[str, Sums, Sums]] = []
        for msg in replies:
            if msg.has_error():
                self._error(self._site(msg), HEAD_STATS, msg.error.reason)
                continue
            problem = self._refuse(msg, "train")  # shape, site name (claimed here), counts
            stats = {} if problem else {k: v.numpy() for k, v in arrays_of(msg).items()}
            problem = problem or head_stats_problem(stats, sizes, metrics_of(msg))
            if problem:
                self._error(
                    self._site(msg), HEAD_STATS, f"reply rejected: {problem}", rejected=True
                )
                continue
            train, val = (from_arrays(stats, split, sizes) for split in SPLITS)
            sums.append((self._site(msg), train, val))
        replied = {self._node(m) for m in replies}
        for node in self._sampled.get("evaluate", []):
            if node not in replied:
                self._error(self.names.label(node), HEAD_STATS, "no reply")
        if not sums:
            return None
        sums.sort(key=lambda s: s[0])  # summed in the sites' order, whatever order they came in
        train, val = (reduce(add, (s[i] for s in sums)) for i in (1, 2))
        return train, val, [s[0] for s in sums], self.current.get("errors", [])

    def configure_train(self, server_round, arrays, config, grid):  # noqa: D102
        self.current = {"round": server_round + self.round_offset, "started": time.time()}
        self._cohort(grid)
        self._global = {k: v.numpy() for k, v in arrays.items()}
        msgs = list(
            self.inner.configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        self._sampled["train"] = [m.metadata.dst_node_id for m in msgs]
        if self.control is not None:
            self.control.attach(msgs)
        return msgs

    def aggregate_train(self, server_round, replies: Iterable[Message]):  # noqa: D102
        good = self._screen(self._note("train", list(replies)))
        if not good:
            log.warning("round %s: no usable update; the global model is kept", server_round)
            self.current["train"] = {}
            return None, None
        # summed in the order the sites finished, the model differed in its last bits between
        # two runs of one seed (and training amplified it): sum in the sites' order instead
        good.sort(key=self._site)
        own = self._aggregate_parts(good)
        sent = consistent_metrics(good)  # after the parts: an older site's eye counts are filled
        base = getattr(self.inner, "strategy", self.inner)
        frozen = untrained_keys(good, self._global) if isinstance(base, FedOpt) else []
        moments = ServerMoments(base)
        private = isinstance(self.inner, DP_WRAPPERS)
        if private:  # the wrapper's noise z*C/k on the mean of the k updates it gets
            self.inner.num_sampled_clients = len(good)
            clip = float(self.inner.clipping_norm)
        arrays, _ = self.inner.aggregate_train(server_round + self.round_offset, good)
        metrics = aggregate_metrics(sent, self.counts.weight_key)  # each over its senders
        if own and arrays is not None and not isinstance(self.inner, FedOpt):
            # the inner rule over equal arrays gives them up to rounding: give them exactly
            # (FedAdam instead took its server step towards them)
            for key, value in own.items():
                arrays[key] = Array(np.asarray(value, order="C"))
        self.current["train"] = dict(metrics) if metrics is not None else {}
        self.current["aggregated"] = sorted(self._site(m) for m in good)
        if arrays is None:
            return None, metrics
        moments.keep(frozen)  # no site trained them: FedAdam must not move them
        arrays, bad = released(arrays, self._global, frozen)
        if bad:  # nothing is released; the global model and FedAdam's moments stay
            moments.undo()
            self.current["refused"] = f"the aggregate has non-finite values (e.g. {bad[0]})"
            log.error("round %s: %s", self.current.get("round"), self.current["refused"])
            return None, metrics
        if self.control is not None:
            deltas = [self._deltas[m.metadata.message_id] for m in good]
            self.control.update(deltas, [metrics_of(m) for m in good])
        if private:
            arrays = self._release(arrays, len(good), clip)
        return arrays, metrics

    def _aggregate_parts(self, replies: list[Message]) -> dict[str, np.ndarray]:
        """Each part over the sites that trained it (`part_aggregation.aggregate_parts`); the
        round record names the sites behind each separately aggregated part."""
        base = getattr(self.inner, "strategy", self.inner)
        private = isinstance(self.inner, DP_WRAPPERS)
        own, record = aggregate_parts(replies, base, self._global, self._site, private=private)
        if record is not None:
            self.current["part-aggregation"] = record
        if record and "refused" in record:
            log.error("round %s: per-part aggregation refused: %s", self.current.get("round"),
                      record["refused"])  # fmt: skip
        return own

    def _release(self, arrays, k: int, clip: float):
        """The DP wrapper's release over the round's cohort m (`site_dp.over_cohort`): the sum
        of the k aggregated updates over m, noise z*C/m. Recorded and journalled."""
        m = max(len(self._sampled.get("train", [])), k)
        if k < m:
            arrays = over_cohort(arrays, self._global, k, m)
            log.warning(
                "round %s: site-level DP over %d of %d sites; missing or refused sites count "
                "as zero updates (the release is the sum over m=%d)", self.current["round"], k, m, m,
            )  # fmt: skip
        release = release_record(self.inner, self.current.get("round"), m, k, clip)
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
        for msg in good:
            self.counts.commit(self._site(msg), metrics_of(msg), "evaluate")
        sent = consistent_metrics(good)  # Flower's rule sees consistent replies
        metrics = None
        if good and self.inner.aggregate_evaluate(server_round + self.round_offset, good):
            metrics = aggregate_metrics(sent, self.counts.weight_key)  # each over its senders
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


def build_strategy(
    fed: FedConfig, parameters: dict[str, tuple[int, ...]] | None = None
) -> RemdrStrategy:
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
    return RemdrStrategy(wrap(base(**kwargs), fed), fed, parameters)
