"""Screening a reply before anything reads it: its shape, its metrics and the counts that
weigh its site.

Flower's strategies expect every reply to carry exactly one ArrayRecord (train) and one
MetricRecord, all with the same keys and the weight key, and raise `InconsistentMessageReplies`
otherwise, which ends the run and every resume of it (`validate_message_reply_consistency` in
`flwr/serverapp/strategy/strategy_utils.py`). remdr checks each reply on its own instead: a
reply without that shape, without a site name, or with counts or metrics that cannot be true is
refused and named in the round record, like a bad update; the replies that pass are trimmed to
the metrics they all share (`consistent_metrics`) before the inner strategy sees them, and the
round's aggregate of each metric is taken over the sites that sent it.

The counts that weigh a site in a mean are bounded by the federation's own records: at most
`max-site-examples`, and at most `GROWTH` times what the site reported the first time it was
accepted (kept across coordinator restarts), so no site can take the weight of the others by
claiming more eyes than it had. `unit-weight`, site-level DP's weight, is 1 for every site.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flwr.app import Message, MetricRecord, RecordDict
from remdr.server.drift_control import CONTROL
from remdr.server.reply_metrics import metrics_of

from remdr.federation.screening import count_problem, metric_problem
from remdr.federation.site_round import RECEIVED

GROWTH = 2.0  # a site's counts may grow to this multiple of its first accepted counts
SITE_NAME = re.compile(r"(?!\.+$)[A-Za-z0-9._-]{1,128}")  # as remdr-client's --site-id
UNIT = "unit-weight"
# the counts that weigh a site, by the ledger entry that bounds them: its training eyes weigh
# its update, its validation eyes the validation that selects the best model
TRAIN_COUNTS = {
    "num-examples": "num-examples",
    "num-val": "num-val",
    f"{RECEIVED}num-val": "num-val",
}
EVALUATE_COUNTS = {"num-examples": "num-val", "num-val": "num-val"}


def shape_problem(msg: Message, phase: str, *, control: bool) -> str | None:
    """Why `msg` has not the shape of a `phase` reply; None if it has: one ArrayRecord of
    weights (train; plus SCAFFOLD's `control` when `control`), none in an evaluate reply, one
    MetricRecord, and a `site` record whose `site-id` is a site name."""
    content = msg.content
    arrays = [k for k in content.array_records if not (control and k == CONTROL)]
    want = 1 if phase == "train" else 0
    if len(arrays) != want:
        extra = " besides the control variate" if control and phase == "train" else ""
        return f"{len(arrays)} ArrayRecords{extra} (a {phase} reply has {want})"
    if len(content.metric_records) != 1:
        return f"{len(content.metric_records)} MetricRecords (a reply has 1)"
    site = content.config_records.get("site")
    if site is None:
        return "no site record"
    name = site.get("site-id")
    if not isinstance(name, str) or not SITE_NAME.fullmatch(name):
        return f"site-id {str(name)[:40]!r} is not a site name"
    return None


def site_id(msg: Message) -> str:
    """The site a reply says it is from (after `shape_problem` passed it)."""
    return str(msg.content.config_records["site"]["site-id"])


class SiteCounts:
    """Each site's first accepted counts, and the bounds they set on its later ones."""

    def __init__(self, cap: float, *, weight_key: str = "num-examples") -> None:
        self.cap, self.weight_key = float(cap), weight_key
        self.first: dict[str, dict[str, float]] = {}

    def problem(self, site: str, metrics: Mapping[str, Any], phase: str) -> str | None:
        """Why the counts of `site`'s `phase` reply cannot weigh it; None if they can."""
        if "num-examples" not in metrics:
            return "no num-examples"
        if self.weight_key == UNIT and UNIT not in metrics:
            return f"no {UNIT} (site-level DP weighs every site by it)"
        if UNIT in metrics and (isinstance(metrics[UNIT], bool) or metrics[UNIT] != 1):
            return f"{UNIT} {str(metrics[UNIT])[:40]} is not 1 (every site weighs the same)"
        counts = TRAIN_COUNTS if phase == "train" else EVALUATE_COUNTS
        first = self.first.get(site, {})
        for key, entry in counts.items():
            if key not in metrics:
                continue
            positive = phase == "train" and key == "num-examples"
            problem = count_problem(key, metrics[key], positive=positive, cap=self.cap)
            if problem:
                return problem
            if entry in first and metrics[key] > GROWTH * max(first[entry], 1.0):
                return (
                    f"{key} {metrics[key]:g} grew more than {GROWTH:g}x over the "
                    f"{first[entry]:g} this site first reported"
                )
        return metric_problem(metrics)

    def commit(self, site: str, metrics: Mapping[str, Any], phase: str) -> None:
        """Record an accepted reply's counts as its site's first where it has none yet."""
        counts = TRAIN_COUNTS if phase == "train" else EVALUATE_COUNTS
        first = self.first.setdefault(site, {})
        seen: dict[str, float] = {}
        for key, entry in counts.items():
            if key in metrics:
                seen[entry] = max(seen.get(entry, 0.0), float(metrics[key]))
        for entry, value in seen.items():
            first.setdefault(entry, value)

    def state_dict(self) -> dict[str, dict[str, float]]:
        return {site: dict(counts) for site, counts in self.first.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.first = {str(s): {str(k): float(v) for k, v in c.items()} for s, c in state.items()}


def consistent_metrics(replies: list[Message]) -> list[RecordDict]:
    """Trim every reply's metrics to the keys all of them carry, as Flower's strategies
    require, and return the metrics as sent: a site may share fewer metrics (its metrics
    policy) or more (a newer version), and the round's aggregate of each metric is over the
    sites that sent it, as a site's NaN is left out of it (`reply_metrics.aggregate_metrics`)."""
    records = [metrics_of(m) for m in replies]
    sent = [RecordDict({"metrics": MetricRecord(dict(r))}) for r in records]
    if records:
        shared = set.intersection(*(set(r) for r in records))
        for record in records:
            for key in [k for k in record if k not in shared]:
                del record[key]
    return sent
