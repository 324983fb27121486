"""Screening a site's update before anything aggregates it.

One bad site (a bug, a corrupt disk, an attacker) must not poison the global model: an update
with missing or extra arrays, a wrong shape or dtype, NaN/Inf values, or an absurd norm is
rejected with a reason the coordinator can read. Robust aggregation (FedMedian, trimmed mean,
Krum) is the second line of defence for updates that look valid but are not.

A site with one modality (an OCT-only hospital) trains only some parts of the model
(`remdr.model.model_part`) and says so in its reply: `eyes-oct`, `eyes-fundus` and
`eyes-complete` count its training eyes with each image. It sends a part no eye of it trained
back exactly as received, so an update that changed such a part, or counts that cannot be true,
are rejected too: the coordinator aggregates each part over the sites that trained it only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from remdr.model import model_part

# The reply metric that counts the training eyes behind each modality part of the model; the
# "shared" part (e.g. the absent-modality embeddings) is trained by every eye (num-examples).
PART_COUNTS = {"oct": "eyes-oct", "fundus": "eyes-fundus", "fusion": "eyes-complete"}
_EYES = {"oct": "OCT", "fundus": "fundus", "fusion": "complete"}  # for the reasons


def update_problem(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray], max_norm: float
) -> str | None:
    """Why `update` (a site's weights) cannot be aggregated with the global `reference`; None if
    it can. The norm is of the change, update - reference, over the update's floating-point
    arrays (integer counters are not weights)."""
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        return "wrong keys: " + ", ".join(parts)
    squared = 0.0
    for key, ref in reference.items():
        arr = np.asarray(update[key])
        if arr.shape != ref.shape:
            return f"wrong shape for {key}: {arr.shape}, expected {ref.shape}"
        # FedAvg hands back integer buffers (BatchNorm's counters) as floats, so only a
        # non-numeric array is a dtype error.
        if not np.issubdtype(arr.dtype, np.number):
            return f"wrong dtype for {key}: {arr.dtype}, expected numbers like {ref.dtype}"
        if np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                return f"non-finite values (NaN/Inf) in {key}"
            squared += float(np.sum((arr.astype(np.float64) - ref.astype(np.float64)) ** 2))
    norm = math.sqrt(squared)
    if max_norm > 0 and norm > max_norm:
        return f"update norm {norm:.3g} exceeds the limit {max_norm:g} (max-update-norm)"
    return None


def trained_counts(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The training eyes behind each part of a site's update, by part ("oct", "fundus",
    "fusion", "shared"). A reply without `eyes-*` metrics (a site older than them) trained
    every part on all its eyes."""
    n = float(metrics["num-examples"])
    counts = {part: float(metrics.get(key, n)) for part, key in PART_COUNTS.items()}
    counts["shared"] = n
    return counts


def counts_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's `eyes-*` counts cannot be true (the aggregation weighs parts by them);
    None if they can, or if the reply has none (an older site: every part trained)."""
    n = metrics.get("num-examples")
    if isinstance(n, bool) or not isinstance(n, int | float) or not n >= 0:
        return f"no usable num-examples: {n!r}"
    given = [key for key in PART_COUNTS.values() if key in metrics]
    if not given:
        return None
    if len(given) < len(PART_COUNTS):
        lacking = sorted(set(PART_COUNTS.values()) - set(given))
        return f"eye counts incomplete: {', '.join(given)} without {', '.join(lacking)}"
    for key in PART_COUNTS.values():
        value = metrics[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"{key} is not a number: {value!r}"
        if not math.isfinite(value) or not float(value).is_integer():
            return f"{key} is not a whole number of eyes: {value!r}"
        if value < 0:
            return f"{key} is negative: {value:g}"
        if value > n:
            return f"{key} {value:g} exceeds num-examples {n:g}"
    return None


def untrained_part_problem(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray], counts: Mapping[str, float]
) -> str | None:
    """Why `update` cannot be a site's training when it changed a part of the global
    `reference` that, by its own `counts` (`trained_counts`), no eye of it trained; None if it
    left every such part exactly as received."""
    for part in PART_COUNTS:
        if counts[part] > 0:
            continue
        changed = [
            key
            for key, ref in reference.items()
            if model_part(key) == part and not np.array_equal(update[key], ref)
        ]
        if changed:
            return (
                f"changed the {part} part ({len(changed)} arrays, e.g. {changed[0]}) but "
                f"trained no {_EYES[part]} eyes"
            )
    return None
