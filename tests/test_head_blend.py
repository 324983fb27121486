"""`head-blend`: a complete eye's fused prediction blended with one unimodal head, the head and
weight chosen on validation once training ends, in pooled training and by a federation's
coordinator from its sites' validation probes; the choice travels with the final weights only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from remdr.checkpoint import load_run
from remdr.config import apply_overrides
from remdr.experiment import load_splits, train_and_test, write_run
from remdr.federation.run_directory import RunDirectory, choose_blend
from remdr.head_blend import blended, choose, probe_metrics, set_blend
from remdr.methods import build_model
from remdr.train import make_loader, predict

MODALITIES = ("oct", "fundus")


def _preds(n: int, seed: int, fused_noise: float = 3.0) -> dict[str, np.ndarray]:
    """Eyes whose OCT head is better than a noisy fused prediction; a fifth have no fundus."""
    rng = np.random.default_rng(seed)
    md = rng.normal(-5, 5, n)
    has_fundus = rng.random(n) > 0.2
    pred_fundus = np.where(has_fundus, md + rng.normal(0, 6, n), np.nan)
    return {
        "md": md,
        "pred": md + rng.normal(0, fused_noise, n),
        "pred_oct": md + rng.normal(0, 2.0, n),
        "pred_fundus": pred_fundus,
        "has_oct": np.ones(n, bool),
        "has_fundus": has_fundus,
    }


def _metrics(p: dict[str, np.ndarray]) -> dict[str, float]:
    return {"mse": float(np.mean((p["pred"] - p["md"]) ** 2)), **probe_metrics(p, MODALITIES)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_chosen_weight_is_the_validation_optimum(seed):
    p = _preds(80, seed)
    grid = np.linspace(0, 1, 2001)
    brute = min(
        (float(np.mean((blended(p, m, w) - p["md"]) ** 2)), m, w) for m in MODALITIES for w in grid
    )
    blend = choose(_metrics(p), MODALITIES)
    assert blend.modality == brute[1] == "oct"
    assert blend.weight == pytest.approx(brute[2], abs=1e-3)
    assert blend.mse == pytest.approx(brute[0], rel=1e-5)
    assert blend.mse < _metrics(p)["mse"]


def test_the_fusion_head_alone_is_kept_when_it_is_best():
    p = _preds(80, 0, fused_noise=0.0)  # exact: any weight on a head only adds its error
    blend = choose(_metrics(p), MODALITIES)
    assert (blend.modality, blend.weight) == ("", 0.0)
    assert blend.mse == _metrics(p)["mse"]


def test_the_mean_of_site_probes_chooses_what_pooled_validation_would():
    """What the coordinator averages (each site's MSEs weighted by its validation eyes) is the
    pooled validation's MSE, so the federation chooses the blend pooling would."""
    sites = [_preds(n, seed) for n, seed in ((12, 3), (40, 4), (90, 5))]
    pooled = {k: np.concatenate([s[k] for s in sites]) for k in sites[0]}
    per_site = [{f"val-{k.replace('_', '-')}": v for k, v in _metrics(s).items()} for s in sites]
    counts = np.array([len(s["md"]) for s in sites], float)
    aggregate = {
        k: float(np.dot(counts, [m[k] for m in per_site]) / counts.sum()) for k in per_site[0]
    }
    federated, central = choose_blend(aggregate), choose(_metrics(pooled), MODALITIES)
    assert federated is not None
    assert (federated.modality, federated.weight) == (central.modality, central.weight)
    assert federated.mse == pytest.approx(central.mse, rel=1e-9)


def _model(tiny_cfg, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(apply_overrides(tiny_cfg, {"head-blend": True})).eval()


def _inputs(tiny_cfg):
    torch.manual_seed(1)
    d = tiny_cfg.data
    oct = torch.randn(4, d.n_bscans, 1, d.image_size, d.image_size)
    fundus = torch.randn(4, d.fundus_channels, d.image_size, d.image_size)
    present = {"oct": torch.ones(4, dtype=torch.bool), "fundus": torch.tensor([1, 1, 0, 1]) > 0}
    return oct, fundus, present


def test_a_blend_changes_only_complete_eyes_at_evaluation(tiny_cfg):
    model = _model(tiny_cfg)
    oct, fundus, present = _inputs(tiny_cfg)
    with torch.no_grad():
        before = model(oct, fundus, present=present)
        model.head_blend.copy_(torch.tensor([0.4, 0.0]))
        after = model(oct, fundus, present=present)
    mixed = 0.6 * before["pred"] + 0.4 * before["pred_oct"]
    complete = present["fundus"]
    torch.testing.assert_close(after["pred"][complete], mixed[complete])
    torch.testing.assert_close(after["pred"][~complete], before["pred"][~complete])  # OCT head
    assert not torch.allclose(after["pred"][complete], before["pred"][complete])
    model.train()
    with torch.no_grad():
        torch.manual_seed(2)
        blended_train = model(oct, fundus, present=present)["pred"]
        model.head_blend.zero_()
        torch.manual_seed(2)
        plain_train = model(oct, fundus, present=present)["pred"]
    torch.testing.assert_close(blended_train, plain_train)  # training sees the fusion head


def test_a_blend_travels_with_the_weights_and_only_when_chosen(tiny_cfg):
    model, other = _model(tiny_cfg), _model(tiny_cfg, seed=1)
    assert "head_blend" not in model.state_dict()  # what a federation sends: never the blend
    model.head_blend.copy_(torch.tensor([0.0, 0.3]))
    state = model.state_dict()
    torch.testing.assert_close(state["head_blend"], torch.tensor([0.0, 0.3]))
    other.load_state_dict(state)
    torch.testing.assert_close(other.head_blend, torch.tensor([0.0, 0.3]))
    other.load_state_dict({}, strict=False)  # a partial load (a site's own norm layers)
    torch.testing.assert_close(other.head_blend, torch.tensor([0.0, 0.3]))
    model.head_blend.zero_()
    fresh = _model(tiny_cfg, seed=2)
    fresh.load_state_dict(model.state_dict())  # a checkpoint without one: no blend
    assert not fresh.head_blend.any()


def _evaluate(p: dict[str, np.ndarray]) -> dict[str, float]:
    return {f"val-{k.replace('_', '-')}": v for k, v in _metrics(p).items()} | {"num-val": 80}


def test_the_federation_best_model_carries_the_blend_its_validation_chose(tiny_cfg, tmp_path):
    model = _model(tiny_cfg)
    run = RunDirectory(tmp_path)
    run.save_round(1, model.state_dict(), {"num-examples": 10})
    run.add_evaluation(1, _evaluate(_preds(80, 0)), {})  # the OCT head beats the fused output
    weights = load_file(str(tmp_path / "best.safetensors"))
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["head-blend"]["modality"] == "oct" and 0 < best["head-blend"]["weight"] <= 1
    assert best["head-blend"]["val-mse"] < best["val-mse"]
    assert weights["head_blend"].tolist() == pytest.approx([best["head-blend"]["weight"], 0.0])
    assert "head_blend" not in load_file(str(tmp_path / "round-001.safetensors"))
    loaded = _model(tiny_cfg, seed=3)
    loaded.load_state_dict(weights)
    torch.testing.assert_close(loaded.head_blend, weights["head_blend"])

    run.save_round(2, model.state_dict(), {"num-examples": 10})
    run.add_evaluation(2, _evaluate(_preds(80, 0, fused_noise=0.0)), {})  # better, fused best
    assert json.loads((tmp_path / "best.json").read_text())["round"] == 2
    assert "head-blend" not in json.loads((tmp_path / "best.json").read_text())
    assert "head_blend" not in load_file(str(tmp_path / "best.safetensors"))


def test_pooled_training_applies_the_blend_it_reports(tiny_data, tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, {"head-blend": True, "epochs": 2})
    data = load_splits(tiny_data, cfg)
    outcome = train_and_test(cfg, data, progress=False)
    assert outcome.blend is not None
    outcome.model.head_blend.copy_(outcome.blend.weights(MODALITIES) + torch.tensor([0.0, 0.1]))
    write_run(tmp_path, cfg, data, outcome, str(tiny_data))  # what remdr-predict loads
    torch.testing.assert_close(load_run(tmp_path)[0].head_blend, outcome.model.head_blend)
    assert (
        json.loads((tmp_path / "metrics.json").read_text())["head_blend"] == outcome.blend.to_dict()
    )
    set_blend(outcome.model, outcome.blend)
    loader = make_loader(data.val, 16, shuffle=False, seed=0, device=torch.device("cpu"))
    val = predict(outcome.model, loader, torch.device("cpu"))
    assert float(np.mean((val["pred"] - val["md"]) ** 2)) == pytest.approx(
        outcome.blend.mse, rel=1e-4
    )
    assert outcome.blend.mse <= outcome.fit.best_val_mse + 1e-6
