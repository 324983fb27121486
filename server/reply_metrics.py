"""The metrics sites send with their replies, and how the coordinator combines them.

Most metrics are averaged over the sites, weighted by their examples. A site's privacy spend
and its own test split stay per site (never averaged: one site's epsilon averaged with
another's is no guarantee of anyone, and nothing may select on a site's test split); the counts
of training eyes add up.
"""

from __future__ import annotations

import math

from flwr.app import Message, MetricRecord, RecordDict

from remdr.federation.site_round import RECEIVED

# Per-site only, never averaged: a site's privacy spend (`dp-*`: each site's value stays in the
# round record and in report.privacy) and its own test split (`test-*`: reported per site).
PER_SITE_ONLY = ("dp-", "test-", "num-test", RECEIVED)
# Counts summed over the sites, not averaged: the round's training eyes of each kind.
SUMMED = ("eyes-",)
# Keys only some sites send (a site's own shipped test split, the model it received scored on
# it): recorded per site, then dropped from the reply, because Flower refuses to aggregate
# replies whose metric keys differ (InconsistentMessageReplies).
MAY_DIFFER = ("test-", "num-test", f"{RECEIVED}test-", f"{RECEIVED}num-test")


def metrics_of(msg: Message) -> MetricRecord:
    """The reply's metric record (a site sends one)."""
    return next(iter(msg.content.metric_records.values()))


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


def drop_site_only_keys(msg: Message) -> None:
    """Remove the keys only some sites send (`MAY_DIFFER`) once they are recorded."""
    for record in msg.content.metric_records.values():
        for key in [k for k in record if k.startswith(MAY_DIFFER)]:
            del record[key]


def received_scores(received: dict[str, dict]) -> tuple[dict, dict[str, dict]]:
    """(aggregate, per-site `eval-*` metrics) of the sites' validation of the model they
    received, by site; the aggregate weighs each site by its validation eyes (`num-val`, which
    screening bounds: this aggregate selects the best model)."""
    per_site = {s: {f"eval-{k}": v for k, v in m.items()} for s, m in received.items()}
    records = [
        RecordDict({"metrics": MetricRecord({**m, "num-examples": m.get("num-val", 0)})})
        for m in received.values()
    ]
    return dict(aggregate_metrics(records, "num-examples")), per_site
