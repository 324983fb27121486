"""Eyes with one image: the model, every method's loss, training and prediction."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY

from remdr.config import ExperimentConfig, apply_overrides
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.experiment import SplitData, train_and_test
from remdr.methods import build_model, create_method
from remdr.metrics import metrics_by_kind
from remdr.registry import list_methods

KINDS = {"complete": ("oct", "fundus"), "oct-only": ("oct",), "fundus-only": ("fundus",)}


def _cfg(**extra) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), {**TINY, "oct-view": "bscans", **extra})


def _records(tiny_data, cfg, pattern: tuple[str, ...]):
    """The tiny dataset's eyes, the i-th made of kind pattern[i % len(pattern)]."""
    records = load_dataset(tiny_data, cfg.data, quiet=True).records
    return [
        dataclasses.replace(r, modalities=KINDS[pattern[i % len(pattern)]])
        for i, r in enumerate(records)
    ]


def _split(tiny_data, cfg, records) -> SplitData:
    """32 training, 8 validation and the rest test eyes, in order."""
    return SplitData(
        load_dataset(tiny_data, cfg.data, quiet=True),
        EyeDataset(records[:32], cfg.data),
        EyeDataset(records[32:40], cfg.data),
        EyeDataset(records[40:], cfg.data),
    )


def _batch(tiny_data, cfg, pattern, n=12) -> dict[str, torch.Tensor]:
    eyes = EyeDataset(_records(tiny_data, cfg, pattern)[:n], cfg.data)
    return torch.utils.data.default_collate([eyes[i] for i in range(len(eyes))])


@pytest.mark.parametrize("name", [n for n in list_methods(private=False)])
def test_every_method_has_a_finite_loss_on_a_batch_of_mixed_eyes(tiny_data, name):
    cfg = _cfg(method=name)
    batch = _batch(tiny_data, cfg, ("complete", "oct-only", "fundus-only"))
    method = create_method(name, cfg.method)
    method.setup(batch["md"].numpy())
    model = build_model(cfg, method)
    loss, parts = method.loss(model, batch)
    assert torch.isfinite(loss), parts
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_a_branch_without_input_gets_no_gradient_and_absent_terms_are_skipped(tiny_data):
    cfg = _cfg(method="remdr")
    batch = _batch(tiny_data, cfg, ("oct-only",))
    method = create_method("remdr", cfg.method)
    method.setup(batch["md"].numpy())
    model = build_model(cfg, method)
    loss, parts = method.loss(model, batch)
    loss.backward()
    assert "mse_fundus" not in parts and "con_fundus" not in parts
    assert "mse_oct" in parts and "con_oct" in parts
    for name, p in model.named_parameters():
        if name.startswith(("branches.fundus", "heads.fundus")):
            assert p.grad is None, name  # never computed on the zeros standing in for it
        if name.startswith("branches.oct"):
            assert p.grad is not None, name
    oct_grad = sum(p.grad.abs().sum() for p in model.branches["oct"].parameters())
    assert oct_grad > 0
    assert model.absent["fundus"].weight.grad.abs().sum() > 0  # the fusion head's stand-in


def test_the_unimodal_terms_are_those_of_the_eyes_that_have_the_image(tiny_data):
    cfg = _cfg(method="remdr_no_sagm")
    mixed = _batch(tiny_data, cfg, ("complete", "fundus-only"))
    method = create_method("remdr_no_sagm", cfg.method)
    method.setup(mixed["md"].numpy())
    model = build_model(cfg, method).eval()
    _, parts = method.loss(model, mixed)
    has_oct = mixed["has_oct"]
    subset = {k: v[has_oct] for k, v in mixed.items()}
    _, parts_subset = method.loss(model, subset)
    assert parts["mse_oct"] == pytest.approx(parts_subset["mse_oct"], rel=1e-5)
    assert parts["con_oct"] == pytest.approx(parts_subset["con_oct"], rel=1e-5)


def test_modality_dropout_hides_one_image_of_complete_eyes_from_fusion_only():
    cfg = _cfg(**{"modality-dropout": 1.0})
    model = build_model(cfg).train()
    torch.manual_seed(0)
    masks = {"oct": torch.ones(64, dtype=torch.bool), "fundus": torch.ones(64, dtype=torch.bool)}
    seen = model._fusion_masks(masks)
    assert not (seen["oct"] & seen["fundus"]).any()  # p = 1: every complete eye loses one
    assert (seen["oct"] | seen["fundus"]).all()  # never both
    assert 10 < int(seen["oct"].sum()) < 54  # a fair coin picks which
    assert model.eval()._fusion_masks(masks) == masks  # never at evaluation


def test_training_and_prediction_with_every_kind_of_eye(tiny_data):
    cfg = _cfg(method="remdr", epochs=2, **{"modality-dropout": 0.3})
    records = _records(tiny_data, cfg, ("complete", "complete", "oct-only", "fundus-only"))
    data = _split(tiny_data, cfg, records)
    out = train_and_test(cfg, data, progress=False)
    assert np.isfinite(out.test_preds["pred"]).all()  # every eye gets a prediction
    by_kind = metrics_by_kind(out.test_preds)
    assert set(by_kind) == {"complete", "oct-only", "fundus-only"}
    assert all(np.isfinite(m["mse"]) for m in by_kind.values())
    # a head of an absent modality predicts nothing for that eye
    assert np.isnan(out.test_preds["pred_fundus"][~out.test_preds["has_fundus"]]).all()


def test_a_unimodal_method_learns_and_predicts_only_for_eyes_with_its_image(tiny_data):
    cfg = _cfg(method="oct", epochs=1)
    records = _records(tiny_data, cfg, ("complete", "fundus-only"))
    data = _split(tiny_data, cfg, records)
    out = train_and_test(cfg, data, progress=False)
    has_oct = out.test_preds["has_oct"]
    assert np.isfinite(out.test_preds["pred"][has_oct]).all()
    assert np.isnan(out.test_preds["pred"][~has_oct]).all()
    assert out.test_metrics["n"] == int(has_oct.sum())


@pytest.mark.parametrize("name", list_methods(private=True))
def test_a_private_loss_on_mixed_eyes_is_a_sum_of_per_patient_terms(tiny_data, name):
    """DP-SGD clips each patient's gradient: a row's loss may not depend on which other rows
    have which image (no count of present rows in a denominator)."""
    cfg = _cfg(method=name)
    batch = _batch(tiny_data, cfg, ("complete", "oct-only", "fundus-only"), n=6)
    method = create_method(name, cfg.method)
    model = build_model(cfg, method).eval()
    whole, _ = method.loss(model, batch)
    rows = [method.loss(model, {k: v[i : i + 1] for k, v in batch.items()})[0] for i in range(6)]
    assert torch.isfinite(whole)
    assert float(whole) * 6 == pytest.approx(float(sum(rows)), rel=1e-4)


def test_at_evaluation_an_eye_with_one_image_is_predicted_by_that_modalitys_head(tiny_data):
    cfg = _cfg()
    batch = _batch(tiny_data, cfg, ("complete", "oct-only", "fundus-only"))
    model = build_model(cfg).eval()
    present = {"oct": batch["has_oct"], "fundus": batch["has_fundus"]}
    with torch.no_grad():
        out = model(batch["oct"], batch["fundus"], present=present)
        fused = model.train()(batch["oct"], batch["fundus"], present=present)["pred"]
    only_oct = batch["has_oct"] & ~batch["has_fundus"]
    only_fundus = batch["has_fundus"] & ~batch["has_oct"]
    complete = batch["has_oct"] & batch["has_fundus"]
    assert torch.equal(out["pred"][only_oct], out["pred_oct"][only_oct])
    assert torch.equal(out["pred"][only_fundus], out["pred_fundus"][only_fundus])
    assert not torch.equal(out["pred"][complete], out["pred_oct"][complete])  # fusion there
    assert fused.shape == out["pred"].shape
