"""Screening a site's update before anything aggregates it.

One bad site (a bug, a corrupt disk, an attacker) must not poison the global model: an update
with missing or extra arrays, a wrong shape or dtype, NaN/Inf values, or an absurd norm is
rejected with a reason the coordinator can read. Robust aggregation (FedMedian, trimmed mean,
Krum) is the second line of defence for updates that look valid but are not.
"""

from __future__ import annotations

import math

import numpy as np


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
