"""Known-answer tests of the contrastive loss and of sharpness-aware gradient modulation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from remdr.config import MethodConfig, apply_overrides
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.losses import LabelDensity, adaptive_margin_supcon, negative_margins
from remdr.methods import build_model, create_method
from remdr.optim import ModalityScores, frozen_buffers, sam_perturbation
from remdr.train import make_loader

KW = dict(delta=1.0, tau=0.1, gamma=0.5, span=10.0, weight_clip=5.0)


def supcon_reference(z: torch.Tensor, y: torch.Tensor, delta: float, tau: float) -> torch.Tensor:
    """Plain SupCon written anchor by anchor, as in Khosla et al. (2020)."""
    u = torch.nn.functional.normalize(z, dim=-1)
    losses = []
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and abs(y[i] - y[j]) <= delta]
        if not pos:
            continue
        denom = sum(torch.exp(u[i] @ u[a] / tau) for a in range(len(y)) if a != i)
        losses.append(-sum(torch.log(torch.exp(u[i] @ u[p] / tau) / denom) for p in pos) / len(pos))
    return torch.stack(losses).mean()


def _labels(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.cat(
        [
            torch.zeros(n // 2) - torch.rand(n // 2, generator=g),
            -20 * torch.rand(n // 2, generator=g),
        ]
    )
    return torch.randn(n, 8, generator=g, dtype=torch.float64), y


def test_mu_zero_is_plain_supcon():
    z, y = _labels()
    density = LabelDensity.fit(y.numpy(), 2.0)
    ours = adaptive_margin_supcon(z, y, density=density, mu=0.0, **KW)
    ref = supcon_reference(z.float(), y, delta=1.0, tau=0.1)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_margin_grows_with_label_distance_and_anchor_rarity():
    y = torch.tensor([0.0, 0.0, -3.0, -8.0, -25.0, -26.0, -0.5, -0.2])
    density = LabelDensity.fit(np.r_[np.zeros(200), -np.linspace(0, 30, 20)], 2.0)
    m = negative_margins(y, density, mu=0.5, **KW)
    assert m[0, 1] == 0 and m[0, 6] == 0  # positives get no margin
    assert 0 < m[0, 2] < m[0, 3] < m[0, 4]  # farther negatives, larger margin
    assert m[0, 4] == m[0, 5]  # saturates beyond delta + span
    # the same distance (|dy| = 25) from a rare severe anchor gets a larger margin than from a normal one
    assert m[4, 0] > m[0, 4]
    assert torch.all(negative_margins(y, density, mu=0.0, **KW) == 0)


def test_margin_raises_the_loss_and_anchors_without_positives_are_skipped():
    z, y = _labels()
    density = LabelDensity.fit(y.numpy(), 2.0)
    plain = adaptive_margin_supcon(z, y, density=density, mu=0.0, **KW)
    assert adaptive_margin_supcon(z, y, density=density, mu=0.5, **KW) > plain
    lonely = torch.tensor([0.0, -10.0, -20.0, -30.0])  # no positive pairs at all
    loss = adaptive_margin_supcon(
        torch.randn(4, 8, requires_grad=True), lonely, density=density, mu=0.5, **KW
    )
    assert loss.item() == 0.0 and loss.requires_grad


def supcon_with_memory_reference(z, y, mem_z, mem_y, delta, tau):
    """Plain SupCon with memory candidates, anchor by anchor: the batch's anchors contrast
    with every other batch row and every memory row."""
    u = torch.nn.functional.normalize(z, dim=-1)
    keys = [(u[j], y[j], j) for j in range(len(y))] + [
        (m, t, None) for m, t in zip(mem_z, mem_y, strict=True)
    ]
    losses = []
    for i in range(len(y)):
        cands = [(k, t) for k, t, j in keys if j != i]
        pos = [k for k, t in cands if abs(y[i] - t) <= delta]
        if not pos:
            continue
        denom = sum(torch.exp(u[i] @ k / tau) for k, _ in cands)
        losses.append(-sum(torch.log(torch.exp(u[i] @ p / tau) / denom) for p in pos) / len(pos))
    return torch.stack(losses).mean()


def test_memory_candidates_give_a_small_batch_positives():
    from remdr.losses import EmbeddingMemory

    z, y = _labels(16, seed=4)
    density = LabelDensity.fit(y.numpy(), 2.0)
    batch, lonely = (z[:4], torch.tensor([0.0, -10.0, -20.0, -30.0]))  # no positive in-batch
    memory = EmbeddingMemory(size=6)
    memory.push(z[4:8], torch.tensor([0.3, -10.4, -1.0, -5.0]))
    memory.push(z[8:12], torch.tensor([-19.6, -2.0, -30.2, -7.0]))  # the oldest two drop out
    mem_u, mem_y = memory.get()
    assert len(mem_y) == 6 and torch.equal(
        mem_y, torch.tensor([-1.0, -5.0, -19.6, -2.0, -30.2, -7.0])
    )
    assert adaptive_margin_supcon(batch, lonely, density=density, mu=0.0, **KW).item() == 0.0
    ours = adaptive_margin_supcon(
        batch, lonely, density=density, mu=0.0, memory=(mem_u, mem_y), **KW
    )
    ref = supcon_with_memory_reference(batch.float(), lonely, mem_u, mem_y, delta=1.0, tau=0.1)
    assert ours.item() > 0 and ours.item() == pytest.approx(ref.item(), rel=1e-5)
    empty = (torch.zeros(0, 8), torch.zeros(0))
    assert adaptive_margin_supcon(
        z, y, density=density, memory=empty, **KW
    ).item() == pytest.approx(adaptive_margin_supcon(z, y, density=density, **KW).item())


def test_the_memory_is_filled_by_training_and_never_saved(tiny_cfg, tiny_data):
    cfg = apply_overrides(tiny_cfg, {"method": "remdr", "con-memory": 20})
    method = create_method("remdr", cfg.method)
    model = build_model(cfg, method)
    ds = EyeDataset(load_dataset(tiny_data, cfg.data).records, cfg.data)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for i, batch in enumerate(make_loader(ds, 8, shuffle=True, seed=0, device=torch.device("cpu"))):
        method.step(model, opt, batch, epoch=0)
        held = len(method.memory["oct"].get()[1])
        assert held == min(20, 8 * (i + 1))  # one push per step: SAM's ascent pass adds none
        if i == 3:
            break
    assert "memory" not in str(method.state_dict())


def test_loss_is_invariant_to_batch_order():
    z, y = _labels(24, seed=3)
    density = LabelDensity.fit(y.numpy(), 2.0)
    perm = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    a = adaptive_margin_supcon(z, y, density=density, mu=0.5, **KW)
    b = adaptive_margin_supcon(z[perm], y[perm], density=density, mu=0.5, **KW)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def _setup(tiny_cfg, tiny_data, name: str, **method_overrides):
    cfg = apply_overrides(tiny_cfg, {"dropout": 0.0, "modality-dropout": 0.0, **method_overrides})
    ds = EyeDataset(load_dataset(tiny_data, cfg.data).records[:16], cfg.data)
    batch = next(iter(make_loader(ds, 16, shuffle=False, seed=0, device=torch.device("cpu"))))
    torch.manual_seed(0)
    method = create_method(name, cfg.method)
    method.setup(ds.targets())
    model = build_model(cfg, method).train()
    return cfg, method, model, batch


def test_gradient_reaches_both_encoders(tiny_cfg, tiny_data):
    _, method, model, batch = _setup(tiny_cfg, tiny_data, "remdr")
    loss, parts = method.loss(model, batch)
    loss.backward()
    assert parts["con_oct"] > 0 and parts["con_fundus"] > 0
    for m in ("oct", "fundus"):
        grads = [
            p.grad.abs().sum() for p in model.branches[m].encoder.parameters() if p.grad is not None
        ]
        assert grads and sum(grads) > 0


def test_sam_second_pass_runs_at_theta_plus_rho_g_over_norm_g():
    """L = 0.5 * ||theta||^2 at theta = (3, 4): g = (3, 4), ||g|| = 5, so with rho = 0.5 the
    second pass runs at (3.3, 4.4) and sees the gradient (3.3, 4.4); theta then comes back."""
    a, b = torch.nn.Parameter(torch.tensor([3.0])), torch.nn.Parameter(torch.tensor([4.0]))
    (0.5 * (a**2 + b**2)).sum().backward()
    with sam_perturbation([a, b], rho=0.5):
        assert (a.item(), b.item()) == pytest.approx((3.3, 4.4))
        a.grad = b.grad = None
        (0.5 * (a**2 + b**2)).sum().backward()
    assert (a.grad.item(), b.grad.item()) == pytest.approx((3.3, 4.4))
    assert (a.item(), b.item()) == (3.0, 4.0)
    # DP-SAT's given direction u = (0, -2): theta + 0.5 * u / ||u|| = (3, 3.5)
    with sam_perturbation([a, b], rho=0.5, direction=[torch.zeros(1), torch.tensor([-2.0])]):
        assert (a.item(), b.item()) == pytest.approx((3.0, 3.5))


def test_sam_step_descends_with_the_gradient_taken_at_the_ascent_point(tiny_cfg, tiny_data):
    """The `sam` method's whole step with SGD(lr=1) equals theta - g(theta + rho g/||g||)."""
    cfg = apply_overrides(tiny_cfg, {"dropout": 0.0, "modality-dropout": 0.0, "sam-rho": 0.5})
    _, method, model, batch = _setup(cfg, tiny_data, "sam")
    expected_model = copy.deepcopy(model)
    params = [p for p in expected_model.parameters() if p.requires_grad]
    method.loss(expected_model, batch)[0].backward()
    g = [p.grad.clone() for p in params]
    # ||g|| as the norm of the per-tensor norms and theta + (rho/||g||) g with one rounding, as
    # the step does: the tiny OCT stem normalises channels of near-zero variance over 16 eyes, so
    # a last-bit change of theta (1e-8) moves its gradient by 1% and the order of float ops shows
    norm = float(torch.stack([x.norm() for x in g]).norm())
    with torch.no_grad():
        for p, x in zip(params, g, strict=True):
            p.add_(x, alpha=0.5 / norm)  # the ascent point, by hand
    expected_model.zero_grad()
    method.loss(expected_model, batch)[0].backward()
    expected = [p.detach() - p.grad - 0.5 * x / norm for p, x in zip(params, g, strict=True)]
    method.step(model, torch.optim.SGD(model.parameters(), lr=1.0), batch, epoch=0)
    got = [p.detach() for p in model.parameters() if p.requires_grad]
    for e, p in zip(expected, got, strict=True):
        torch.testing.assert_close(p, e, rtol=1e-4, atol=1e-5)


def test_sam_restores_parameters_exactly(tiny_cfg, tiny_data):
    _, method, model, batch = _setup(tiny_cfg, tiny_data, "sam")
    method.loss(model, batch)[0].backward()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    with sam_perturbation(params, rho=0.5):
        assert any(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    assert all(torch.equal(p, b) for p, b in zip(params, before, strict=True))


@pytest.mark.parametrize("name", ["sam", "remdr"])
def test_two_pass_step_updates_running_stats_once(name, tiny_cfg, tiny_data):
    _, method, model, batch = _setup(tiny_cfg, tiny_data, name)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(batch["oct"], batch["fundus"])  # exactly one training-mode forward
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    method.step(model, opt, batch, epoch=0)
    bufs = dict(model.named_buffers())
    for k, v in reference.named_buffers():
        assert torch.equal(bufs[k], v), k
    assert any("num_batches_tracked" in k and v.item() == 1 for k, v in bufs.items())
    # lr = 0: after both passes the weights are bit-for-bit where they started
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )


def test_frozen_buffers_discard_a_pass(tiny_cfg, tiny_data):
    _, _, model, batch = _setup(tiny_cfg, tiny_data, "concat")
    before = {k: v.clone() for k, v in model.named_buffers()}
    with frozen_buffers(model), torch.no_grad():
        model(batch["oct"], batch["fundus"])
    assert all(torch.equal(before[k], v) for k, v in model.named_buffers())


def test_sagm_scales_only_the_dominant_encoder(tiny_cfg, tiny_data):
    """OCT is made the clearly stronger modality (low unimodal MSE): only its branch is damped."""
    _, method, model, batch = _setup(tiny_cfg, tiny_data, "remdr")
    _, plain, model_b, _ = _setup(tiny_cfg, tiny_data, "remdr", **{"mod-alpha": 0.0})
    model_b.load_state_dict(model.state_dict())
    for m in (method, plain):
        m.scores.values = {"oct": 0.05, "fundus": 2.0}
    opt_a, opt_b = (
        torch.optim.SGD(model.parameters(), lr=0.0),
        torch.optim.SGD(model_b.parameters(), lr=0.0),
    )
    method.step(model, opt_a, batch, epoch=0)
    plain.step(model_b, opt_b, batch, epoch=0)
    k = method.last_k
    s = method.scores.values
    assert k["fundus"] == 1.0 and plain.last_k == {"oct": 1.0, "fundus": 1.0}
    assert k["oct"] == pytest.approx(1 - math.tanh(0.5 * (s["fundus"] / s["oct"] - 1)))
    assert 0 < k["oct"] < 1
    grads_b = dict(model_b.named_parameters())
    for name, p in model.named_parameters():
        expected = grads_b[name].grad * (k["oct"] if name.startswith("branches.oct.") else 1.0)
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7, msg=name)


def test_rho_zero_is_a_plain_step(tiny_cfg, tiny_data):
    _, sam, model_a, batch = _setup(tiny_cfg, tiny_data, "sam", **{"sam-rho": 0.0})
    _, concat, model_b, _ = _setup(tiny_cfg, tiny_data, "concat")
    model_b.load_state_dict(model_a.state_dict())
    sam.step(model_a, torch.optim.SGD(model_a.parameters(), lr=0.1), batch, epoch=0)
    concat.step(model_b, torch.optim.SGD(model_b.parameters(), lr=0.1), batch, epoch=0)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_modality_scores_pick_the_weaker_and_window():
    s = ModalityScores(("oct", "fundus"), decay=0.5)
    s.update({"oct": 1.0, "fundus": 3.0})
    s.update({"oct": 1.0, "fundus": 1.0})
    assert s.values == {"oct": 1.0, "fundus": 2.0}
    k = s.coefficients(alpha=0.5)
    assert k["fundus"] == 1.0 and k["oct"] == pytest.approx(1 - math.tanh(0.5))
    assert s.coefficients(alpha=0.0) == {"oct": 1.0, "fundus": 1.0}
    method = create_method("remdr", MethodConfig(mod_start_epoch=1, mod_end_epoch=3))
    assert [method.modulation_active(e) for e in range(4)] == [False, True, True, False]
