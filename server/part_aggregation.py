"""Each part of the model aggregated over the sites that trained it.

Sites with one modality train only some parts of the model (`remdr.model.model_part`): an
OCT-only hospital has no eye for the fundus branch or the fusion head, and sends them back as
received (`eyes-*` counts in its reply). Each part is aggregated over the sites that trained it,
weighted by the eyes behind it, so a part is never pulled towards the global values by sites
without data for it. A complete federation is aggregated as before, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, MultiKrum, Strategy
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from remdr.server.reply_metrics import metrics_of

from remdr.federation.screening import PART_COUNTS, trained_counts
from remdr.model import model_part

PART_WEIGHT = "eyes"  # the weight of one part's own aggregation: the eyes that trained it


def arrays_of(msg: Message) -> ArrayRecord:
    """The reply's array record (a site sends one)."""
    return next(iter(msg.content.array_records.values()))


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


def aggregate_parts(
    replies: list[Message],
    base: Strategy,
    global_state: dict[str, np.ndarray],
    site_of: Callable[[Message], str],
    *,
    private: bool,
) -> tuple[dict[str, np.ndarray], dict | None]:
    """Aggregate each part over the sites that trained it, weighted by the eyes behind it
    (`eyes-*`; the shared part by num-examples, as always); return (those parts, the round
    record's `part-aggregation` entry, or None when every part is aggregated as usual).

    A part gets its own aggregate only where the ordinary one would differ: some site did not
    train it or, for a weighted rule, trained it on fewer eyes than it has. The aggregate is
    written into every reply, so the inner strategy's mean (FedAvg, FedProx) is that aggregate,
    FedAdam takes its server step towards it, and the robust rules see the part as its trainers
    agreed on it; a part no site trained stays global. Under site-level DP (`private`) this is
    refused: its noise is calibrated to one plain mean of every site's update, and there an
    untrained part counts as a zero update.
    """
    if any(key in metrics_of(m) for m in replies for key in PART_COUNTS.values()):
        for m in replies:  # an older site trained every part on all its eyes; Flower
            metrics = metrics_of(m)  # aggregates only replies with the same metrics
            for key in PART_COUNTS.values():
                if key not in metrics:
                    metrics[key] = metrics["num-examples"]
    weighted = not (private or isinstance(base, FedMedian | FedTrimmedAvg | MultiKrum))
    counts = [trained_counts(metrics_of(m)) for m in replies]
    own = []
    for part in PART_COUNTS:
        keys = [k for k in global_state if model_part(k) == part]
        if weighted:
            differs = any(c[part] != c["shared"] for c in counts)
        else:
            differs = any(c[part] == 0 for c in counts)
        if keys and differs:
            own.append((part, keys))
    if not own:
        return {}, None
    if private:
        trained = ", ".join(
            f"{part} by {sum(c[part] > 0 for c in counts)} of {len(counts)}" for part, _ in own
        )
        reason = (
            f"sites trained different parts of the model ({trained} sites), but site-level "
            "DP needs one plain mean of every site's update: a site's untrained part counts "
            "as a zero update, not aggregated over its trainers only"
        )
        return {}, {"refused": reason}
    out: dict[str, np.ndarray] = {}
    record: dict = {}
    for part, keys in own:
        trainers = [(m, c[part]) for m, c in zip(replies, counts, strict=True) if c[part] > 0]
        if trainers:
            arrays = [{k: arrays_of(m)[k].numpy() for k in keys} for m, _ in trainers]
            aggregate = aggregate_part(base, arrays, [eyes for _, eyes in trainers])
        else:
            aggregate = {k: global_state[k] for k in keys}
        for m in replies:
            rec = arrays_of(m)
            for k in keys:
                rec[k] = Array(np.asarray(aggregate[k], order="C"))
        out.update(aggregate)
        record[part] = sorted(site_of(m) for m, _ in trainers)
    return out, record


def untrained_keys(replies: list[Message], global_state: dict[str, np.ndarray]) -> list[str]:
    """The keys of the parts of the model no reply trained this round (no eye behind them)."""
    counts = [trained_counts(metrics_of(m)) for m in replies]
    parts = {p for p in PART_COUNTS if counts and all(c[p] == 0 for c in counts)}
    return [k for k in global_state if model_part(k) in parts]


class ServerMoments:
    """A server optimiser's moments (FedAdam's m_t and v_t) as they were before its step.

    FedAdam moves every array by its first moment, so a part no site trained this round (zero
    change) would still move, and its moments decay as if it had been trained: `keep` puts
    those parts' moments back (their weights stay global); `undo` puts all of them back when
    the step is not released."""

    NAMES = ("m_t", "v_t")

    def __init__(self, base: Strategy) -> None:
        self.base = base
        self.saved = {n: dict(getattr(base, n, None) or {}) for n in self.NAMES}

    def keep(self, keys: list[str]) -> None:
        for name, old in self.saved.items():
            new = getattr(self.base, name, None)
            for key in keys if new else []:
                if key in new:
                    new[key] = old[key] if key in old else np.zeros_like(new[key])

    @classmethod
    def state_of(cls, base: Strategy) -> dict[str, np.ndarray]:
        """The moments as checkpoint arrays (`m_t/<key>`, `v_t/<key>`)."""
        return {
            f"{name}/{k}": np.asarray(v)
            for name in cls.NAMES
            for k, v in (getattr(base, name, None) or {}).items()
        }

    @classmethod
    def load(cls, base: Strategy, arrays: dict[str, np.ndarray]) -> None:
        """Restore the moments `state_of` saved (a resumed FedAdam continues exactly)."""
        for name in cls.NAMES:
            part = {k[len(name) + 1 :]: v for k, v in arrays.items() if k.startswith(f"{name}/")}
            if part:
                setattr(base, name, part)

    def undo(self) -> None:
        for name, old in self.saved.items():
            if getattr(self.base, name, None):
                setattr(self.base, name, old or None)
