"""Centralised training end to end: data -> splits -> model -> fit -> test metrics -> run dir.

Used by `remdr-train`, `remdr-bench` and the simulator's centralised comparison.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from remdr.checkpoint import save_run
from remdr.config import ExperimentConfig
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.data.loading import Dataset
from remdr.data.splits import split_records
from remdr.head_blend import Blend, choose, set_blend
from remdr.head_refit import HeadRefit, refit_heads, refittable, split_sums
from remdr.methods import Method, build_model, create_method
from remdr.metrics import metrics_by_kind, scored_metrics
from remdr.model import ReM3Dr
from remdr.registry import get_spec
from remdr.runtime import prepare_model, resolve_device, seed_everything
from remdr.train import FitResult, evaluate, fit, make_loader, predict

log = logging.getLogger(__name__)


@dataclass
class SplitData:
    dataset: Dataset
    train: EyeDataset
    val: EyeDataset
    test: EyeDataset

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}


def load_splits(
    data_path: str | Path, cfg: ExperimentConfig, split_seed: int | None = None
) -> SplitData:
    """Load and split a dataset; `cfg.data.oct_view="auto"` becomes the view of the data."""
    ds = load_dataset(data_path, cfg.data)
    seed = cfg.train.seed if split_seed is None else split_seed
    parts = split_records(ds.records, cfg.data.val_fraction, cfg.data.test_fraction, seed)
    return SplitData(ds, *(EyeDataset(parts[s], cfg.data) for s in ("train", "val", "test")))


@dataclass
class Outcome:
    model: ReM3Dr
    method: Method
    fit: FitResult
    test_metrics: dict[str, float]
    test_preds: dict[str, np.ndarray]
    test_curve: list[tuple[float, float]] = field(default_factory=list)  # (train s, test MSE)
    blend: Blend | None = None  # `head-blend`'s choice on the validation eyes
    refit: HeadRefit | None = None  # `head-refit`'s choices on the validation eyes


def train_and_test(
    cfg: ExperimentConfig,
    data: SplitData,
    *,
    progress: bool = True,
    desc: str | None = None,
    test_curve: bool = False,
) -> Outcome:
    """Train on `data.train` (best epoch by validation), then test. With `test_curve`, also
    the test MSE after every epoch against training seconds (the simulator's wall-clock view;
    reported only, never used to choose anything)."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, device)
    method = create_method(cfg.train.method, cfg.method)
    method.setup(data.train.targets(), seed=cfg.train.seed)
    model = prepare_model(build_model(cfg, method), device)
    loader = make_loader(data.test, cfg.train.batch_size * 2, shuffle=False, seed=0, device=device)
    curve: list[tuple[float, float]] = []

    def score_test(epoch: int, seconds: float) -> None:
        preds = predict(model, loader, device)
        curve.append((seconds, float(scored_metrics(preds).get("mse", float("nan")))))

    result = fit(
        model,
        method,
        data.train,
        cfg=cfg.train,
        device=device,
        val_ds=data.val,
        augment=cfg.data.augment_scale,
        progress=progress,
        desc=desc or cfg.train.method,
        privacy=cfg.privacy,
        on_epoch=score_test if test_curve and len(data.test) else None,
    )
    refitted = _refit_head(model, data, cfg, device) if cfg.method.head_refit else None
    blend = _choose_blend(model, data.val, cfg, device) if model.blends else None
    preds = predict(model, loader, device)
    metrics = scored_metrics(preds)
    return Outcome(model, method, result, metrics, preds, curve, blend, refitted)


def _refit_head(model, data: SplitData, cfg: ExperimentConfig, device) -> HeadRefit | None:
    """`head-refit`: each head's output layer refitted on the training eyes' hidden
    activations, strength chosen on the validation eyes (`remdr.head_refit`)."""
    if not (refittable(model) and len(data.train) and len(data.val)):
        return None
    if get_spec(cfg.train.method).private:  # the Grams are outside DP-SGD's accounting
        return None
    sums = split_sums(
        model, {"train": data.train, "val": data.val}, cfg.train.batch_size * 2, device
    )
    # the blend is chosen after, as ever
    return refit_heads(model, sums["train"], sums["val"], blend=False)


def _choose_blend(model, val: EyeDataset, cfg: ExperimentConfig, device) -> Blend | None:
    """`head-blend`: the head and weight with the lowest validation MSE, written into the
    model as training left it (the best epoch's weights, where `fit` keeps the best)."""
    if not len(val):
        return None
    loader = make_loader(val, cfg.train.batch_size * 2, shuffle=False, seed=0, device=device)
    blend = choose(evaluate(model, loader, device), model.modalities)  # with the probes
    set_blend(model, blend)
    return blend


def write_run(
    out: Path, cfg: ExperimentConfig, data: SplitData, outcome: Outcome, data_path: str
) -> None:
    """model.safetensors, config.json, metrics.json, predictions.csv and pred_vs_true.png."""
    from remdr.plots import scatter_pred_vs_true

    save_run(
        out,
        outcome.model,
        cfg,
        {"method_state": outcome.method.state_dict(), "data": str(data_path)},
    )
    metrics = {
        "method": cfg.train.method,
        "test": outcome.test_metrics,
        "test_by_kind": metrics_by_kind(outcome.test_preds),
        "best_epoch": outcome.fit.best_epoch,
        "best_val_mse": outcome.fit.best_val_mse,
        "head_blend": outcome.blend.to_dict() if outcome.blend else None,
        "head_refit": outcome.refit.to_dict() if outcome.refit else None,
        "train_seconds": outcome.fit.seconds,
        "history": outcome.fit.history,
        "split_sizes": data.sizes(),
        "privacy": outcome.fit.privacy or {"guarantee": "none"},
        "data_report": data.dataset.report.to_dict(),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
    ids = [r.eye_id for r in data.test.records]
    kinds = [r.kind for r in data.test.records]
    lines = ["eye_id,md,md_pred,input"] + [
        f"{i},{t:.3f},{p:.3f},{k}"
        for i, t, p, k in zip(
            ids, outcome.test_preds["md"], outcome.test_preds["pred"], kinds, strict=True
        )
    ]
    (out / "predictions.csv").write_text("\n".join(lines) + "\n")
    known = np.isfinite(outcome.test_preds["pred"])
    if known.any():
        scatter_pred_vs_true(
            outcome.test_preds["md"][known],
            outcome.test_preds["pred"][known],
            out / "pred_vs_true.png",
            title=cfg.train.method,
        )
