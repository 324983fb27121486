"""The global model the coordinator releases: in the model's own dtypes, and finite.

Flower's mean (and FedAdam's step) turns an integer counter (BatchNorm's `num_batches_tracked`)
into float64. Cast back, the global model keeps the dtypes of the initial model, so screening can
require every update to match them exactly (an integer array of any value would pass a finite
check). A release with a non-finite value (DP noise past float32's range, which Flower casts to
the weights' dtype) is never made: the round keeps the previous global model.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def in_dtypes(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> ArrayRecord:
    """`arrays` with each array in its `reference` dtype (integers rounded half to even)."""
    out = {}
    for key, array in arrays.items():
        value = array.numpy()
        want = reference[key].dtype if key in reference else value.dtype
        if value.dtype != want:
            if np.issubdtype(want, np.integer) and not np.issubdtype(value.dtype, np.integer):
                info = np.iinfo(want)
                value = np.clip(np.rint(value), info.min, info.max)
            value = value.astype(want)
        out[key] = Array(np.asarray(value, order="C"))
    return ArrayRecord(out)


def non_finite(arrays: ArrayRecord) -> list[str]:
    """The keys of `arrays` with a NaN or infinite value."""
    bad = []
    for key, array in arrays.items():
        value = array.numpy()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad.append(key)
    return bad


def released(
    arrays: ArrayRecord, reference: dict[str, np.ndarray], keep: list[str]
) -> tuple[ArrayRecord, list[str]]:
    """(the aggregate as the coordinator may release it: the `keep` keys at their `reference`
    values, every array in its reference dtype; the keys with a non-finite value, where nothing
    may be released)."""
    for key in keep:
        arrays[key] = Array(np.asarray(reference[key], order="C"))
    bad = non_finite(arrays)
    if bad:
        return arrays, bad
    arrays = in_dtypes(arrays, reference)
    return arrays, non_finite(arrays)


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of global models (`average-rounds`): summed in float64, each
    tensor back in its dtype; integer buffers (counters) are the last model's."""
    out = {}
    for key, last in states[-1].items():
        if last.is_floating_point():
            out[key] = (sum(s[key].double() for s in states) / len(states)).to(last.dtype)
        else:
            out[key] = last.clone()
    return out
