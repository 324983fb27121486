"""The defining property of each multimodal baseline (issue 24), as a known-answer test.

Each test names the mutation it was checked against (a sign or weighting mistake that makes it
fail; each was applied to the code and the test seen failing): multitask's unimodal weight fixed
at 1 or its heads detached; MMPareto's weights swapped; MLA's other modality left visible (both
branches step at once); MLA's projector update sign flipped; UME's weights swapped; MASAM
choosing the lowest score; AGM's ratio inverted.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from remdr.config import apply_overrides
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.methods import build_model, create_method
from remdr.optim import HeadProjector, ShapleyScores, pareto_gradients, pareto_weights
from remdr.train import make_loader
from remdr.update_rules import shapley_prediction


def _setup(cfg, data_dir, name: str, n: int = 12, **overrides):
    cfg = apply_overrides(cfg, {"dropout": 0.0, **overrides})
    ds = EyeDataset(load_dataset(data_dir, cfg.data).records[:n], cfg.data)
    batch = next(iter(make_loader(ds, n, shuffle=False, seed=0, device=torch.device("cpu"))))
    torch.manual_seed(0)
    method = create_method(name, cfg.method)
    method.setup(ds.targets())
    return method, build_model(cfg, method).train(), batch


# -- multitask -----------------------------------------------------------------------------------


def test_multitask_is_fused_plus_weighted_unimodal_mse_through_the_encoders(tiny_cfg, tiny_data):
    """Loss = MSE(fused) + lambda_uni (MSE(oct head) + MSE(fundus head)), and the unimodal terms
    train the encoders (mutations: the weight fixed at 1; the heads detached as probes)."""
    method, model, batch = _setup(tiny_cfg, tiny_data, "multitask", **{"lambda-uni": 0.3})
    out = model(batch["oct"], batch["fundus"])
    y = model.normalise(batch["md"])
    mse = {k: ((out[k] - y) ** 2).mean() for k in ("pred", "pred_oct", "pred_fundus")}
    expected = mse["pred"] + 0.3 * (mse["pred_oct"] + mse["pred_fundus"])
    torch.manual_seed(0)
    loss, _ = method.loss(model, batch)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    branch = list(model.branches["oct"].parameters())
    g_loss = torch.autograd.grad(loss, branch, retain_graph=True, allow_unused=True)
    g_fused = torch.autograd.grad(mse["pred"], branch, retain_graph=True, allow_unused=True)
    g_uni = torch.autograd.grad(mse["pred_oct"], branch, allow_unused=True)
    for a, f, u in zip(g_loss, g_fused, g_uni, strict=True):
        if a is not None:
            torch.testing.assert_close(a, f + 0.3 * u, rtol=1e-4, atol=1e-6)
    assert any(u is not None and u.abs().sum() > 0 for u in g_uni)


# -- MMPareto ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_pareto_direction_never_opposes_either_task(seed):
    """The combined direction a1 g_mm + a2 g_m has a non-negative inner product with both task
    gradients, conflicting or not (mutation: swapping a1 and a2 breaks it for conflicts)."""
    g = torch.Generator().manual_seed(seed)
    g_mm, g_m = torch.randn(50, generator=g), torch.randn(50, generator=g)
    if seed % 2:  # make them conflict
        g_m = g_m - 2 * (g_m @ g_mm) / (g_mm @ g_mm) * g_mm - 0.3 * g_mm
    a1, a2 = pareto_weights(g_mm, g_m)
    d = a1 * g_mm + a2 * g_m
    assert a1 + a2 == pytest.approx(1.0) and 0 < a1 < 1
    assert d @ g_mm >= -1e-5 and d @ g_m >= -1e-5
    if g_mm @ g_m > 0:
        assert (a1, a2) == (0.5, 0.5)
    else:  # min-norm point: no shorter combination
        for t in torch.linspace(0, 1, 21):
            assert d.norm() <= (t * g_mm + (1 - t) * g_m).norm() + 1e-5


def test_pareto_magnitude_is_at_least_the_plain_sum_times_gamma():
    """Aligned gradients: 2 (g_mm/2 + g_m/2) is the plain sum, times gamma. Conflicting: each
    tensor is raised to the plain sum's norm, times gamma."""
    p = torch.nn.Parameter(torch.zeros(2))
    aligned = pareto_gradients([p], [torch.tensor([1.0, 0.0])], [torch.tensor([1.0, 1.0])], 1.5)
    torch.testing.assert_close(aligned[0], 1.5 * torch.tensor([2.0, 1.0]))
    g_mm, g_m = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 2.0])
    out = pareto_gradients([p], [g_mm], [g_m], 1.5)[0]
    assert out.norm() >= 1.5 * (g_mm + g_m).norm() - 1e-6
    assert out @ g_mm >= 0 and out @ g_m >= 0


def test_mmpareto_step_sets_the_encoders_pareto_gradient(tiny_cfg, tiny_data):
    method, model, batch = _setup(tiny_cfg, tiny_data, "mmpareto")
    ref = copy.deepcopy(model)
    terms, _, _ = method.terms(ref, batch)
    params = list(ref.parameters())
    fused = sum(terms["fused"]) + sum(terms["aux"]) if terms["aux"] else sum(terms["fused"])
    g_mm = torch.autograd.grad(fused, params, retain_graph=True, allow_unused=True)
    g_u = torch.autograd.grad(sum(terms["uni"]), params, allow_unused=True)
    by_name = dict(
        zip([n for n, _ in ref.named_parameters()], zip(g_mm, g_u, strict=True), strict=True)
    )
    method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, epoch=0)
    oct_names = [n for n, _ in model.named_parameters() if n.startswith("branches.oct.")]
    oct_params = [p for n, p in model.named_parameters() if n in oct_names]
    expected = pareto_gradients(
        oct_params, [by_name[n][0] for n in oct_names], [by_name[n][1] for n in oct_names], 1.5
    )
    for p, e in zip(oct_params, expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-4, atol=1e-6)
    head = dict(model.named_parameters())["fusion.0.weight"].grad
    a, b = by_name["fusion.0.weight"]
    torch.testing.assert_close(head, a if b is None else a + b, rtol=1e-4, atol=1e-6)


# -- MLA -----------------------------------------------------------------------------------------


def test_mla_updates_one_modality_per_optimiser_step(tiny_cfg, tiny_data):
    """Two optimiser steps per batch; each moves one branch (and the shared head), never the
    other branch (mutation: backward both modalities' losses in one step fails it)."""
    method, model, batch = _setup(tiny_cfg, tiny_data, "mla")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    moved: list[set[str]] = []
    real_step = opt.step

    def step(*args, **kwargs):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        real_step(*args, **kwargs)
        moved.append({n.split(".")[1] for n, p in model.named_parameters()
                      if n.startswith("branches.") and not torch.equal(before[n], p)})  # fmt: skip

    opt.step = step
    method.step(model, opt, batch, epoch=0)
    assert moved == [{"oct"}, {"fundus"}]
    assert list(model.heads) == ["shared"] and model.fusion is None


def test_mla_projector_protects_earlier_inputs():
    """After a step with input r, the projected head gradient barely changes the head's
    response to r, while a direction orthogonal to r passes (mutation: P <- P + ... fails)."""
    proj = HeadProjector(4, alpha=0.01)
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).repeat(8, 1)
    grad = torch.ones(3, 4)
    out = proj.project(grad, r)
    along, across = out[:, 0].abs().max(), out[:, 1].abs().max()
    assert along < 0.05 * across


# -- UME -----------------------------------------------------------------------------------------


def test_ume_predicts_the_weighted_mean_of_its_members(tiny_cfg, tiny_data):
    """Inverse-training-MSE weights: the better (lower MSE) head weighs more; the prediction is
    w_o pred_o + w_f pred_f (mutation: swapped weights fail it)."""
    method, model, batch = _setup(tiny_cfg, tiny_data, "ume")
    method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, epoch=0)
    method.scores.values = {"oct": 1.0, "fundus": 3.0}
    from remdr.update_rules import set_ensemble_weights

    set_ensemble_weights(method, model)
    torch.testing.assert_close(model.ensemble_weights, torch.tensor([0.75, 0.25]))
    model.eval()
    with torch.no_grad():
        out = model(batch["oct"], batch["fundus"])
    torch.testing.assert_close(out["pred"], 0.75 * out["pred_oct"] + 0.25 * out["pred_fundus"])
    fixed = create_method("ume", apply_overrides(tiny_cfg, {"ensemble-oct-weight": 0.2}).method)
    set_ensemble_weights(fixed, model)
    torch.testing.assert_close(model.ensemble_weights, torch.tensor([0.2, 0.8]))


def test_ume_members_train_independently(tiny_cfg, tiny_data):
    """An ensemble of two unimodal models: the OCT branch's gradient ignores the fundus images."""
    method, model, batch = _setup(tiny_cfg, tiny_data, "ume")
    other = dict(batch, fundus=torch.rand_like(batch["fundus"]))
    grads = []
    for b in (batch, other):
        model.zero_grad()
        method.loss(model, b)[0].backward()
        grads.append([p.grad.clone() for p in model.branches["oct"].parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


# -- MASAM ---------------------------------------------------------------------------------------


def test_masam_perturbs_only_the_chosen_encoder(tiny_cfg, tiny_data):
    """In the second pass only the top-scoring modality's branch is away from theta; heads and
    the fusion head keep the first pass's gradient (mutation: perturbing all parameters)."""
    method, model, batch = _setup(tiny_cfg, tiny_data, "masam", **{"sam-rho": 0.5})
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen: list[set[str]] = []

    def snapshot(*_):
        seen.append({n for n, p in model.named_parameters() if not torch.equal(p, theta[n])})

    ref = copy.deepcopy(model)
    method.loss(ref, batch)[0].backward()
    model.register_forward_pre_hook(snapshot)
    method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, epoch=0)
    chosen = next(m for m, k in method.last_k.items() if k == 1.0)
    other = "fundus" if chosen == "oct" else "oct"
    assert len(seen) == 2 and seen[0] == set()
    assert seen[1] and all(n.startswith(f"branches.{chosen}.") for n in seen[1])
    assert not any(n.startswith(f"branches.{other}.") for n in seen[1])
    ref_grads = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        if n.startswith("fusion.") or n.startswith("heads."):
            torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-4, atol=1e-6)


def test_masam_scores_pick_the_faster_learning_modality(tiny_cfg, tiny_data):
    """w = 1: the score is the loss decay alone; the modality whose loss fell below its average
    is perturbed."""
    method, model, batch = _setup(tiny_cfg, tiny_data, "masam", **{"masam-weight": 1.0})
    method.decay.ema = {"oct": 5.0, "fundus": 0.01}
    method.decay.last = {"oct": 9.0, "fundus": 0.01}
    method.step(model, torch.optim.SGD(model.parameters(), lr=0.0), batch, epoch=0)
    assert method.last_k == {"oct": 1.0, "fundus": 0.0}


# -- AGM -----------------------------------------------------------------------------------------


def test_agm_slows_the_modality_that_learns_faster_than_its_history():
    """k_m = exp(alpha (rbar_m - r_m)) with r_m = exp(s_other - s_m): after a history of equal
    scores, OCT's score drops (it learns faster) -> k_oct < 1 < k_fundus, by the known amount
    (mutation: r_m = exp(s_m - s_other) flips both)."""
    s = ShapleyScores(("oct", "fundus"))
    assert s.coefficients({"oct": 0.5, "fundus": 0.5}, alpha=1.0) == {"oct": 1.0, "fundus": 1.0}
    k = s.coefficients({"oct": 0.2, "fundus": 0.5}, alpha=1.0)
    assert k["oct"] == pytest.approx(math.exp(1.0 - math.exp(0.3)))
    assert k["fundus"] == pytest.approx(math.exp(1.0 - math.exp(-0.3)))
    assert k["oct"] < 1 < k["fundus"]
    assert s.means == pytest.approx({"oct": 0.35, "fundus": 0.5})


def test_agm_prediction_is_the_fusion_head_with_scaled_modality_gradients(tiny_cfg, tiny_data):
    method, model, batch = _setup(tiny_cfg, tiny_data, "agm")
    out = model(batch["oct"], batch["fundus"])
    y = model.normalise(batch["md"])
    method.shapley.coefficients({"oct": 0.5, "fundus": 0.5}, 1.0)  # a history
    pred = shapley_prediction(method, model, out, y)
    torch.testing.assert_close(pred, out["pred"], rtol=1e-5, atol=1e-6)
    k = method.last_k
    assert k["oct"] != 1.0 and k["fundus"] != 1.0
    # the gradient of pred w.r.t. the OCT embedding is k_oct times phi_oct's plus k_f times phi_f's
    z = out["z_oct"]
    g_mod = torch.autograd.grad(pred.sum(), z, retain_graph=True)[0]
    g_raw = torch.autograd.grad(out["pred"].sum(), z, retain_graph=True)[0]
    assert not torch.allclose(g_mod, g_raw)
    n = len(y)
    present = {"oct": torch.ones(n, dtype=torch.bool), "fundus": torch.zeros(n, dtype=torch.bool)}
    out_o = model(batch["oct"], batch["fundus"], present=present)
    pred_o = shapley_prediction(method, model, out_o, y)  # phi_fundus = 0 for these eyes
    torch.testing.assert_close(pred_o, out_o["pred"], rtol=1e-5, atol=1e-6)
