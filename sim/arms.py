"""The simulator's models on the global test set: the federation's, and the comparison arms
trained on pooled data (centralized) or on one site's data alone (local)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from remdr.config import ExperimentConfig


def final_model(cfg: ExperimentConfig, fed_dir: Path, rounds: int):
    """The federation's model: its best-validation round, else its last round."""
    from safetensors.torch import load_file

    from remdr.methods import build_model

    model = build_model(cfg)
    best = fed_dir / "best.safetensors"
    model.load_state_dict(
        load_file(str(best if best.is_file() else fed_dir / f"round-{rounds:03d}.safetensors"))
    )
    return model


def test_metrics(model, test_ds, cfg: ExperimentConfig):
    """(metrics, predictions) of `model` on the global test set."""
    from remdr.metrics import scored_metrics
    from remdr.runtime import resolve_device
    from remdr.train import make_loader, predict

    device = resolve_device(cfg.train.device)
    preds = predict(
        model.to(device), make_loader(test_ds, 64, shuffle=False, seed=0, device=device), device
    )
    return scored_metrics(preds), preds


test_metrics.__test__ = False  # a helper, not a pytest test


def paired_interval(test_md, arm: dict, against: dict) -> tuple[float, float, float]:
    """(ratio, low, high): `arm`'s test MSE over `against`'s on the test eyes both predicted,
    and its 95% interval resampling those eyes of both together (`remdr.metrics.ratio_interval`).
    NaN where an arm kept no per-eye predictions (a centralized arm cached by an older remdr)
    or kept them for other eyes than `test_md` (a cache from other data)."""
    import numpy as np

    from remdr.metrics import ratio_interval

    md = np.asarray(test_md, np.float64)
    errors = []
    for a in (arm, against):
        pred = np.asarray(a.get("test_pred", []), np.float64)
        own_md = np.asarray(a.get("test_md", md), np.float64)
        if not len(md) or pred.shape != md.shape or not np.array_equal(own_md, md):
            return math.nan, math.nan, math.nan
        errors.append((pred - md) ** 2)
    low, high = ratio_interval(*errors)  # NaN where too few eyes both arms predicted
    if not (math.isfinite(low) and math.isfinite(high)):
        return math.nan, math.nan, math.nan
    shared = np.isfinite(errors[0]) & np.isfinite(errors[1])  # the eyes it resampled
    return float(errors[0][shared].mean() / errors[1][shared].mean()), low, high


def tested(model, test_ds, cfg: ExperimentConfig) -> dict:
    """An arm's test metrics and its prediction for each test eye, in the test set's order:
    what pairs two arms eye by eye (`remdr.metrics.ratio_interval`)."""
    metrics, preds = test_metrics(model, test_ds, cfg)
    return {"test": metrics, "test_pred": preds["pred"].tolist(), "test_md": preds["md"].tolist()}


def one_image_tests(model, test_records: list, cfg: ExperimentConfig) -> dict:
    """The global test set with one image withheld from every eye (`test_oct_only`,
    `test_fundus_only`): what the fused model predicts for an incomplete eye."""
    from remdr.data.dataset import EyeDataset

    if len(model.modalities) < 2:
        return {}
    out = {}
    for m in model.modalities:
        eyes = [dataclasses.replace(r, modalities=(m,)) for r in test_records]
        out[f"test_{m}_only"] = test_metrics(model, EyeDataset(eyes, cfg.data), cfg)[0]
    return out


def train_central(
    cfg: ExperimentConfig,
    dataset,
    train_ds,
    val_ds,
    test_ds,
    *,
    epochs: int,
    desc: str,
    progress: bool,
) -> dict:
    """Pooled training on `train_ds` with the sites' settings, tested on the global test set."""
    from remdr.experiment import SplitData, train_and_test

    # the same passes over the data and the same learning-rate schedule as the federation
    central_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
    outcome = train_and_test(
        central_cfg, SplitData(dataset, train_ds, val_ds, test_ds), progress=progress, desc=desc,
        test_curve=True,
    )  # fmt: skip
    return {
        "test": outcome.test_metrics,
        "test_pred": outcome.test_preds["pred"].tolist(),
        "test_md": outcome.test_preds["md"].tolist(),  # which eyes, in which order (a cache)
        "best_val_mse": outcome.fit.best_val_mse,
        "final_val_mse": final_val_mse(outcome),
        "wall_seconds": outcome.fit.seconds,
        "test_curve": outcome.test_curve,
        "head_blend": outcome.blend.to_dict() if outcome.blend else None,
        "head_refit": outcome.refit.to_dict() if outcome.refit else None,
    }


def final_val_mse(outcome) -> float:
    """The validation MSE of the model pooled training ends with: after `head-refit` and the
    blend chosen after it (over every validation eye), where they are on."""
    if outcome.blend is not None:
        return outcome.blend.mse
    return outcome.refit.val_mse if outcome.refit else outcome.fit.best_val_mse


CURVE_POINTS = 8  # a test pass costs ~7 site steps: 32 of them were 8% of `make sim`


def federated_test_curve(fed_run, model, test_ds, cfg, fed_seconds: float) -> list:
    """(seconds since the federation started, test MSE) after every k-th round and the last
    (at most CURVE_POINTS + 1 points): the wall-clock view beside the centralized one. Whatever
    is not a round's own time (Flower's start-up, the final evaluation, shutdown) is counted
    before round 1, against the federation."""
    records = fed_run.records()
    if hasattr(model, "head_blend"):
        model.head_blend.zero_()  # each round's model as the sites had it, not the final blend
    elapsed = max(0.0, fed_seconds - sum(float(r.get("seconds", 0.0)) for r in records))
    every = max(1, -(-len(records) // CURVE_POINTS))
    curve = []
    for i, rec in enumerate(records, start=1):
        elapsed += float(rec.get("seconds", 0.0))
        if i % every and i != len(records):
            continue
        model.load_state_dict(fed_run.load_weights(rec["round"]))
        curve.append((elapsed, float(test_metrics(model, test_ds, cfg)[0]["mse"])))
    return curve
