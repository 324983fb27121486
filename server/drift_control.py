"""SCAFFOLD at the coordinator: the federation's control variate c.

c is the example-weighted mean of the sites' control variates c_i (each site's mean gradient,
`remdr.optim.DriftControl`). It goes out with every train message (record `control`); a site
corrects its steps by c - c_i, keeps its new c_i and replies with the change of it, which is
screened like a weight update (keys, shapes, dtype, finite, norm) and then folded into c. Each
part of the model is averaged over the sites that trained it, as the weights are
(`part_aggregation`): an OCT-only site's zero change of the fundus branch does not dilute c.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from remdr.federation.screening import trained_counts
from remdr.model import model_part

CONTROL = "control"  # the record of c in a train message, and of a site's change in its reply
STATE_PREFIX = "control/"  # c's arrays in the strategy's checkpointed state


class ServerControl:
    """c, by trainable parameter (zeros to start: round 1 is plain FedAvg)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.c = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

    def attach(self, messages: list[Message]) -> None:
        record = ArrayRecord({k: Array(v) for k, v in self.c.items()})
        for msg in messages:
            msg.content[CONTROL] = record

    @staticmethod
    def take(reply: Message) -> dict[str, np.ndarray] | None:
        """The site's change of c_i, removed from the reply (the weights' aggregation never
        sees it); None when the reply has none."""
        if CONTROL not in reply.content.array_records:
            return None
        record = reply.content.array_records[CONTROL]
        del reply.content[CONTROL]
        return {k: v.numpy() for k, v in record.items()}

    def problem(self, delta: dict[str, np.ndarray] | None, max_norm: float) -> str | None:
        """Why a site's change of c_i cannot be folded into c; None if it can."""
        if delta is None:
            return "no control variate (drift-control=scaffold needs one in every reply)"
        if set(delta) != set(self.c):
            missing, extra = sorted(set(self.c) - set(delta)), sorted(set(delta) - set(self.c))
            return (
                f"control variate has wrong keys ({len(missing)} missing, {len(extra)} unexpected)"
            )
        squared = 0.0
        for key, ref in self.c.items():
            arr = np.asarray(delta[key])
            if arr.shape != ref.shape:
                return f"control variate {key} has shape {arr.shape}, expected {ref.shape}"
            if arr.dtype != ref.dtype:
                return f"control variate {key} has dtype {arr.dtype}, expected {ref.dtype}"
            if not np.isfinite(arr).all():
                return f"non-finite values (NaN/Inf) in control variate {key}"
            squared += float(np.sum(arr.astype(np.float64) ** 2))
        if max_norm > 0 and math.sqrt(squared) > max_norm:
            return f"control variate change {math.sqrt(squared):.3g} exceeds max-update-norm"
        return None

    def update(self, deltas: list[dict[str, np.ndarray]], metrics: list) -> None:
        """c += the mean of the sites' changes, each part weighted by the eyes that trained it
        and over the sites that trained it. A c that would not be finite (changes within
        max-update-norm 0, i.e. no limit, can still sum past float32) is kept as it was."""
        if not deltas:
            return
        counts = [trained_counts(m) for m in metrics]
        new = dict(self.c)
        for key in self.c:
            part = model_part(key)
            weights = np.array([c[part] for c in counts])
            if weights.sum() <= 0:
                continue
            mean = sum(w * d[key].astype(np.float64) for w, d in zip(weights, deltas, strict=True))
            with np.errstate(over="ignore", invalid="ignore"):
                new[key] = (self.c[key] + mean / weights.sum()).astype(np.float32)
        if all(np.isfinite(v).all() for v in new.values()):
            self.c = new

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"{STATE_PREFIX}{k}": v for k, v in self.c.items()}

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        for key, value in arrays.items():
            if key.startswith(STATE_PREFIX) and key[len(STATE_PREFIX) :] in self.c:
                self.c[key[len(STATE_PREFIX) :]] = np.asarray(value, np.float32)
