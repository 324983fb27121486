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

A site's counts weigh it in every mean (`num-examples` its update, `num-val` its validation, which
selects the best model), so each must be a whole, finite number within the coordinator's bounds
(`count_problem`); every other metric must be a number of plausible size (`metric_problem`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from remdr.head_blend import SITE_PROBE_PREFIX
from remdr.model import model_part

# The reply metric that counts the training eyes behind each modality part of the model; the
# "shared" part (e.g. the absent-modality embeddings) is trained by every eye (num-examples).
PART_COUNTS = {"oct": "eyes-oct", "fundus": "eyes-fundus", "fusion": "eyes-complete"}
_EYES = {"oct": "OCT", "fundus": "fundus", "fusion": "complete"}  # for the reasons


def update_problem(
    update: dict[str, np.ndarray], reference: dict[str, np.ndarray], max_norm: float
) -> str | None:
    """Why `update` (a site's weights) cannot be aggregated with the global `reference`; None if
    it can. Every array must have the reference's shape and dtype (an integer array would pass
    the finite check whatever its values; the coordinator keeps the global model in the
    model's own dtypes, so an honest site always matches). The norm is of the change, update -
    reference, over the floating-point arrays (integer counters are not weights)."""
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
        if arr.dtype != ref.dtype:
            return f"wrong dtype for {key}: {arr.dtype}, expected {ref.dtype}"
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


# -- the counts and metrics of a reply ------------------------------------------------------------

# The largest magnitude any metric may have (a count, a loss, seconds): beyond it a value is
# absurd, and a weighted mean of such values could overflow.
METRIC_LIMIT = 1e12
MAX_METRICS = 256  # metric keys one reply may carry
METRIC_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NON_NEGATIVE = {"mse", "rmse", "mae", "num", "eyes", "seconds", "steps", "records"}


def _number(value: Any) -> float | None:
    """`value` as a float if it is an int or float (not a bool, not a list), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an int beyond float's range
        return math.inf


def count_problem(key: str, value: Any, *, positive: bool, cap: float) -> str | None:
    """Why `value` cannot be a count of eyes that weighs a site (at most `cap`); None if it
    can. A training count (`positive`) must be at least 1: zero weight for every site leaves
    nothing to average."""
    x = _number(value)
    if x is None:
        return f"{key} is not a number: {value!r}"
    if not math.isfinite(x):
        return f"{key} is not finite: {value!r}"
    if not x.is_integer():
        return f"{key} is not a whole number of eyes: {value!r}"
    if x < (1 if positive else 0):
        return f"{key} is not positive: {value!r}" if positive else f"{key} is negative: {x:g}"
    if x > cap:
        return f"{key} {x:g} exceeds max-site-examples {cap:g}"
    return None


def metric_problem(metrics: Mapping[str, Any]) -> str | None:
    """Why a reply's metrics cannot be recorded and averaged; None if they can: at most
    `MAX_METRICS` plain names, each value a number (or list of numbers) that is NaN or within
    `METRIC_LIMIT`, errors and counts never negative."""
    if len(metrics) > MAX_METRICS:
        return f"{len(metrics)} metrics (at most {MAX_METRICS})"
    for key, value in metrics.items():
        if not isinstance(key, str) or not METRIC_KEY.fullmatch(key):
            return f"metric name {str(key)[:40]!r} is not a plain name"
        if isinstance(value, list) and _read_as_one_number(key):
            return f"metric {key} must be one number, not a list"
        for item in value if isinstance(value, list) else [value]:
            x = _number(item)
            if x is None:
                return f"metric {key} is not a number: {str(item)[:40]!r}"
            if math.isnan(x):
                continue
            if not abs(x) <= METRIC_LIMIT:
                return f"metric {key} is absurd: {x:g}"
            if x < 0 and _NON_NEGATIVE & set(key.split("-")):
                return f"metric {key} is negative: {x:g}"
    return None


def _read_as_one_number(key: str) -> bool:
    """The metrics the coordinator weighs, averages or selects the best model by."""
    return key in ("val-mse", "num-val", "num-examples", "unit-weight") or key.startswith(
        ("eyes-", "received-", SITE_PROBE_PREFIX)
    )


def head_stats_problem(
    arrays: Mapping[str, np.ndarray], sizes: Mapping[str, int], counts: Mapping[str, Any]
) -> str | None:
    """Why a site's `head-refit` sums (`remdr.head_refit`) cannot be added to the others; None
    if they can. Each split's and head's Gram must be a finite, symmetric, positive
    semi-definite float64 matrix of the head's size (`sizes`) whose constant column (the
    second-to-last) sums to its row count, and no count may exceed the reply's `num-examples`
    (training) or `num-val` (validation), which are bounded like an update's counts."""
    want = {f"{s}-{h}-{k}" for s in ("train", "val") for h in sizes for k in ("gram", "n")}
    if set(arrays) != want:
        return f"head statistics with {len(arrays)} arrays, expected {sorted(want)[:2]}..."
    for split, count in (("train", "num-examples"), ("val", "num-val")):
        declared = _number(counts.get(count))
        for head, size in sizes.items():
            what = f"{split} statistics of the {head} head"
            gram = np.asarray(arrays[f"{split}-{head}-gram"])
            n = np.asarray(arrays[f"{split}-{head}-n"])
            if gram.shape != (size, size) or n.shape != (1,):
                return f"{what} of shape {gram.shape}, expected ({size}, {size})"
            if gram.dtype != np.float64 or not np.isfinite(gram).all():
                return f"{what} not finite float64"
            if n.dtype != np.int64:
                return f"{what}: its count is {n.dtype}, not int64"
            if declared is None or not 0 <= n[0] <= declared:
                return f"{what} count {n[0]} eyes, more than the reply's {count}"
            scale = max(float(np.abs(gram).max()), 1.0)
            if not np.allclose(gram, gram.T, rtol=0, atol=1e-9 * scale):
                return f"{what} are not symmetric"
            ones = size - 2
            if abs(gram[ones, ones] - n[0]) > 1e-6 * max(n[0], 1):
                return f"{what}: the constant column sums to {gram[ones, ones]:g}, not {n[0]}"
            if np.linalg.eigvalsh(gram).min() < -1e-8 * scale * size:
                return f"{what} are not a Gram matrix (a negative eigenvalue)"
    return None
