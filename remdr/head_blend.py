"""The fused prediction of a complete eye blended with one unimodal head, the weight chosen on
validation once training ends (`head-blend`).

Why: a fusion head trained by few sites, or dragged by a branch that learned little (a fundus
branch trained at two of four sites), can predict worse than the model's own OCT head; one weight
chosen on the validation eyes fixes that at no training cost, and a weight of 0 is the fused
model unchanged. The validation MSE of a blend is exactly quadratic in its weight, so the MSE
at three weights (0: `mse`, and the `PROBES`) gives its minimum in closed form. A federation's
sites send those MSEs like `val-mse`; their weighted mean is the pooled validation's quadratic,
so the coordinator chooses the same weight pooling would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PROBES = (0.5, 1.0)  # the unimodal head's weights at which the validation MSE is measured
PROBE_PREFIX = "mse_blend_"  # `evaluate()`'s probe metrics
SITE_PROBE_PREFIX = "val-mse-blend-"  # the same, as a site reports them


def probe_key(modality: str, weight: float) -> str:
    """`mse_blend_oct_50`: the MSE with the OCT head at weight 0.5 (percent: keys stay plain)."""
    return f"{PROBE_PREFIX}{modality}_{round(weight * 100)}"


def blended(preds: dict[str, np.ndarray], modality: str, weight: float) -> np.ndarray:
    """`predict()`'s fused prediction with `modality`'s head at `weight` on the complete eyes;
    an eye with one image keeps its own head's prediction."""
    complete = preds["has_oct"] & preds["has_fundus"]
    mixed = (1 - weight) * preds["pred"] + weight * preds[f"pred_{modality}"]
    return np.where(complete, mixed, preds["pred"])


def probe_metrics(preds: dict[str, np.ndarray], modalities: tuple[str, ...]) -> dict[str, float]:
    """The MSE at each probe weight for each head, over the eyes the fused model predicts."""
    rows = np.isfinite(preds["pred"])
    out = {}
    for m in modalities:
        for w in PROBES:
            err = (blended(preds, m, w)[rows] - preds["md"][rows]) ** 2
            out[probe_key(m, w)] = float(err.mean()) if rows.any() else float("nan")
    return out


@dataclass(frozen=True)
class Blend:
    modality: str  # the head blended in ("" : none, the fused prediction as it is)
    weight: float  # its weight in [0, 1]
    mse: float  # the validation MSE the blend reaches (the fused model's where weight is 0)

    def weights(self, modalities: tuple[str, ...]) -> torch.Tensor:
        """The model's `head_blend` buffer: each unimodal head's weight."""
        return torch.tensor([self.weight if m == self.modality else 0.0 for m in modalities])

    def to_dict(self) -> dict:
        return {"modality": self.modality, "weight": self.weight, "val-mse": self.mse}


def choose(metrics: dict[str, float], modalities: tuple[str, ...], key: str = "mse") -> Blend:
    """The head and weight with the lowest validation MSE, from `metrics[key]` (the fused
    model's) and the probe MSEs (`probe_key`, prefixed like `key`). Missing or non-finite
    probes: no blend."""
    prefix = key[: -len("mse")]
    base = float(metrics.get(key, float("nan")))
    best = Blend("", 0.0, base)
    if not np.isfinite(base):
        return best
    for m in modalities:
        half, full = (float(metrics.get(prefix + probe_key(m, w), float("nan"))) for w in PROBES)
        if not (np.isfinite(half) and np.isfinite(full)):
            continue
        # mse(w) = a w^2 + b w + base through (0.5, half) and (1, full); a >= 0 (a sum of squares)
        a = 2 * (full - 2 * half + base)
        b = full - base - a
        w = float(np.clip(-b / (2 * a), 0.0, 1.0)) if a > 0 else (1.0 if full < base else 0.0)
        w = round(w, 4)
        mse = a * w * w + b * w + base
        if mse < best.mse - 1e-9:
            best = Blend(m, w, float(mse))
    return best


def set_blend(model: torch.nn.Module, blend: Blend) -> None:
    """Write `blend` into the model's `head_blend` buffer (a model without one is left as is)."""
    if getattr(model, "blends", False):
        model.head_blend.copy_(blend.weights(model.modalities))
