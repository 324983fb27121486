"""Regression metrics for MD in dB, overall and per glaucoma severity bin.

Bins follow the Hodapp-Parrish-Anderson staging with a normal bin: normal >= -2 dB,
early -2..-6, moderate -6..-12, severe < -12 dB. The bin-averaged MAE weighs each present bin
equally, so the rare severe eyes count as much as the many normal ones.
"""

from __future__ import annotations

import math

import numpy as np

BINS = ("normal", "early", "moderate", "severe")
BIN_EDGES = (-2.0, -6.0, -12.0)  # dB, upper edges of early, moderate, severe


def severity_bin(md: float) -> int:
    """0 normal, 1 early, 2 moderate, 3 severe."""
    if md >= BIN_EDGES[0]:
        return 0
    if md >= BIN_EDGES[1]:
        return 1
    if md >= BIN_EDGES[2]:
        return 2
    return 3


def severity_bins(md: np.ndarray) -> np.ndarray:
    md = np.asarray(md, dtype=np.float64)
    return np.select([md >= BIN_EDGES[0], md >= BIN_EDGES[1], md >= BIN_EDGES[2]], [0, 1, 2], 3)


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """MSE (headline), MAE, RMSE, R², Pearson r, % within ±2 dB, per-bin MAE and counts,
    and the bin-averaged MAE. Undefined values (e.g. R² of a constant target) are NaN."""
    y = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} differ in shape")
    n = y.size
    if n == 0:
        return {"n": 0}
    err = p - y
    mse = float(np.mean(err**2))
    var = float(np.var(y))
    pearson = float("nan")
    if n > 1 and np.std(y) > 0 and np.std(p) > 0:
        pearson = float(np.corrcoef(y, p)[0, 1])
    out: dict[str, float] = {
        "n": n,
        "mse": mse,
        "mae": float(np.mean(np.abs(err))),
        "rmse": math.sqrt(mse),
        "r2": 1.0 - mse / var if var > 0 else float("nan"),
        "pearson": pearson,
        "within_2db": float(np.mean(np.abs(err) <= 2.0) * 100.0),
        "md_var": var,
    }
    bins = severity_bins(y)
    per_bin = []
    for b, name in enumerate(BINS):
        mask = bins == b
        out[f"n_{name}"] = int(mask.sum())
        out[f"mae_{name}"] = float(np.mean(np.abs(err[mask]))) if mask.any() else float("nan")
        if mask.any():
            per_bin.append(out[f"mae_{name}"])
    out["mae_bin_avg"] = float(np.mean(per_bin))
    return out


EYE_KINDS = ("complete", "oct-only", "fundus-only")


def eye_kinds(has_oct: np.ndarray, has_fundus: np.ndarray) -> np.ndarray:
    """ "complete", "oct-only" or "fundus-only" per eye, from its image flags."""
    has_oct, has_fundus = np.asarray(has_oct, bool), np.asarray(has_fundus, bool)
    return np.where(has_oct & has_fundus, "complete", np.where(has_oct, "oct-only", "fundus-only"))


def scored_metrics(preds: dict[str, np.ndarray]) -> dict[str, float]:
    """`regression_metrics` of `predict()` output over the eyes that got a prediction (a
    unimodal model gives none, NaN, for an eye without its image)."""
    known = np.isfinite(preds["pred"])
    return regression_metrics(preds["md"][known], preds["pred"][known])


def metrics_by_kind(preds: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """`scored_metrics` per kind of eye (complete / OCT-only / fundus-only) present."""
    if "has_oct" not in preds or not len(preds["pred"]):
        return {}
    kinds = eye_kinds(preds["has_oct"], preds["has_fundus"])
    out = {}
    for kind in EYE_KINDS:
        rows = kinds == kind
        if rows.any():
            out[kind] = scored_metrics(
                {k: v[rows] for k, v in preds.items() if len(v) == len(rows)}
            )
    return out


def ratio_interval(
    errors_a, errors_b, *, level: float = 0.95, draws: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """The paired bootstrap interval of mean(errors_a) / mean(errors_b), two models' squared
    errors on the same eyes (Efron & Tibshirani 1993, the percentile interval).

    Why: two models scored on one test set of a few hundred eyes differ by which eyes it drew as
    well as by their training; resampling the eyes, both models' errors together, shows how far
    their ratio would move on another test set of that size. Eyes either model has no
    prediction for (NaN) are left out; NaN where fewer than two eyes remain."""
    a, b = np.asarray(errors_a, np.float64), np.asarray(errors_b, np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 2 or not b.sum() > 0:
        return math.nan, math.nan
    rng, ratios = np.random.default_rng(seed), []
    chunk = max(1, 2_000_000 // len(a))  # resamples at a time: ~16 MB of indices whatever n
    for start in range(0, draws, chunk):
        rows = rng.integers(0, len(a), size=(min(chunk, draws - start), len(a)))
        with np.errstate(divide="ignore", invalid="ignore"):
            ratios.append(a[rows].mean(1) / b[rows].mean(1))
    ratios = np.concatenate(ratios)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(ratios, [tail, 1.0 - tail])
    return float(low), float(high)
