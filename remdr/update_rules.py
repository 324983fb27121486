"""The update rules a `Method` steps with, one function per `MethodSpec.update` kind.

| update    | one step                                                                        |
|-----------|---------------------------------------------------------------------------------|
| plain     | backward the objective, step                                                    |
| modulate  | plain, the dominant encoder's gradient x k (OGM-GE)                             |
| sam       | SAM: second pass at theta + rho g/||g|| every `sam-every` steps                  |
| sagm      | SAM + modulation (Re-M3Dr, `remdr.optim`)                                       |
| pareto    | MMPareto: per encoder, Pareto weights of the fused and unimodal gradients       |
| masam     | MASAM: SAM on the top-scoring modality's encoder only                           |
| alternate | MLA: one optimiser step per modality through the shared head, projected         |
| agm       | plain; AGM's modulation is inside the objective (`shapley_prediction`)          |
| dpsat     | DP-SGD (Opacus) with DP-SAT and noisy modulation (private methods)              |

The building blocks (scores, Pareto weights, projector, perturbations) are pure and live in
`remdr.optim`; this module wires them into a step. Every rule takes the same arguments, so the
one training loop (`remdr.train.fit`) runs them all.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from remdr.errors import PrivacyError
from remdr.model import ReM3Dr, full_precision
from remdr.optim import (
    DriftControl,
    branch_signal,
    frozen_buffers,
    masam_direction,
    pareto_gradients,
    sam_perturbation,
    scale_gradient,
    scale_gradients,
    tensor_cosines,
)

if TYPE_CHECKING:
    from remdr.methods import Method

Batch = dict[str, torch.Tensor]
Terms = dict[str, list[torch.Tensor]]  # "fused", "uni", "aux" (+ "prox"): the objective's terms
GROUPS = ("fused", "uni", "aux", "prox")
Regulariser = Callable[[ReM3Dr], torch.Tensor] | None


def _leave_fusion_alone(model: torch.nn.Module) -> None:
    """A unimodal stage trains no fused loss: the layers only it reaches (the fusion head, the
    gate) get no gradient at all, not a zero one, so AdamW neither decays them nor counts a step
    for them (which would skew its bias correction once fusion starts)."""
    net = unwrapped(model)
    for layer in (net.fusion, net.gate):
        for p in layer.parameters() if layer is not None else ():
            p.grad = None


def unwrapped(model: torch.nn.Module) -> ReM3Dr:
    """The ReM3Dr inside an Opacus grad-sample wrapper (or the model itself)."""
    return getattr(model, "_module", model)


def total(terms: Terms, groups: tuple[str, ...] = GROUPS) -> torch.Tensor:
    """The sum of the terms of `groups`, added in order (the whole objective by default)."""
    items = [t for g in groups for t in terms.get(g, ())]
    out = items[0]
    for t in items[1:]:
        out = out + t
    return out


def run_step(
    method: Method,
    model: ReM3Dr,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    epoch: int,
    autocast: Callable[[], AbstractContextManager],
    regulariser: Regulariser,
    control: DriftControl | None,
) -> dict[str, float]:
    """One step of `method`'s update rule; returns the first pass's loss parts."""
    update = method.spec.update
    if method.spec.private:
        if control is not None:
            raise PrivacyError(
                f"drift control with the private method {method.name}",
                "its control variates would be mean gradients outside the DP guarantee",
                "drift-control=off",
            )
        return private_step(method, model, optimizer, batch, epoch, autocast, regulariser)
    rule = {"pareto": pareto_step, "masam": masam_step, "alternate": alternate_step}.get(
        update, first_order_step
    )
    parts = rule(method, model, optimizer, batch, epoch, autocast, regulariser, control)
    set_ensemble_weights(method, model)
    for m, k in method.last_k.items():
        parts[f"k_{m}"] = k
    return parts


def _objective(method, model, batch, autocast, regulariser):
    """(terms, parts, outputs), with FedProx's term as "prox" (it goes with the fused group)."""
    with autocast():
        terms, parts, out = method.terms(model, batch)
    if regulariser is not None:
        terms["prox"] = [regulariser(model)]
    return terms, parts, out


def _after_first_pass(method: Method, parts: dict[str, float], control) -> None:
    """What every non-private rule does once the first pass's gradients are in."""
    for m, (z, y) in method._pending.items():  # this batch joins the memory after its loss
        method.memory[m].push(z, y)
    method._pending = {}
    if control is not None:
        control.observe()
    method.scores.update({m: parts.get(f"mse_{m}", float("nan")) for m in method.spec.modalities})
    method._step_count += 1


def _ascent_step(method: Method) -> bool:
    return (method._step_count - 1) % method.cfg.sam_every == 0 and method.cfg.sam_rho > 0


def first_order_step(method, model, optimizer, batch, epoch, autocast, regulariser, control):
    """plain, modulate (OGM-GE), sam and sagm (Re-M3Dr), and agm (modulated in the loss)."""
    update = method.spec.update
    optimizer.zero_grad(set_to_none=True)
    terms, parts, _ = _objective(method, model, batch, autocast, regulariser)
    total(terms).backward()
    _after_first_pass(method, parts, control)
    if update in ("sam", "sagm") and _ascent_step(method):
        params = [p for p in model.parameters() if p.requires_grad]
        with sam_perturbation(params, method.cfg.sam_rho), frozen_buffers(model):
            optimizer.zero_grad(set_to_none=True)
            total(_objective(method, model, batch, autocast, regulariser)[0]).backward()
        method._pending = {}  # the ascent pass's features are not remembered
    # the modulation balances the branches' share of the fused loss: none in a unimodal stage
    if update in ("modulate", "sagm") and method.modulation_active(epoch) and not method.fused_off:
        method.last_k = method.scores.coefficients(method.cfg.mod_alpha)
        noise = method.spec.ogm_noise or method.cfg.ogm_noise
        for m, k in method.last_k.items():
            if k < 1.0:
                scale_gradients(model.encoder_parameters(m), k, noise=noise, gen=method._noise_gen)
    if control is not None:
        control.correct()
    if method.fused_off:
        _leave_fusion_alone(model)
    optimizer.step()
    return parts


def _split_gradients(method, model, batch, autocast, regulariser):
    """One forward, two backwards: the gradients of the unimodal losses ("uni") and of the
    rest ("fused": fused loss, fused-embedding terms, FedProx), per trainable parameter. The
    unimodal loss of modality m reaches only encoder m (and its head), so one backward of
    their sum gives every encoder's own unimodal gradient. p.grad is set to their sum."""
    params = [p for p in model.parameters() if p.requires_grad]
    terms, parts, out = _objective(method, model, batch, autocast, regulariser)
    fused = total(terms, ("fused", "aux", "prox"))
    g_mm = torch.autograd.grad(fused, params, retain_graph=True, allow_unused=True)
    g_uni = torch.autograd.grad(total(terms, ("uni",)), params, allow_unused=True)
    for p, a, b in zip(params, g_mm, g_uni, strict=True):
        p.grad = (
            None if a is None and b is None else (a if b is None else b if a is None else a + b)
        )
    return (
        params,
        dict(zip(params, g_mm, strict=True)),
        dict(zip(params, g_uni, strict=True)),
        parts,
    )


def pareto_step(method, model, optimizer, batch, epoch, autocast, regulariser, control):
    """MMPareto (Wei & Hu, ICML 2024). Per encoder (branch) m: g_mm and g_m, the gradients of
    the fused loss and of m's unimodal loss; aligned, they are averaged, conflicting, the
    min-norm (MGDA) weights pick the direction no worse for either; x2, raised per tensor to
    the plain sum's norm, x gamma (`optim.pareto_gradients`). Heads and the fusion head keep the
    plain sum. Regression: every cross-entropy is an MSE on normalised MD; nothing else
    changes. Cost: one forward and two backwards (the official code backwards four times)."""
    optimizer.zero_grad(set_to_none=True)
    _, g_mm, g_uni, parts = _split_gradients(method, model, batch, autocast, regulariser)
    _after_first_pass(method, parts, control)
    for m in method.spec.modalities:
        branch = model.encoder_parameters(m)
        new = pareto_gradients(
            branch, [g_mm[p] for p in branch], [g_uni[p] for p in branch], method.cfg.pareto_gamma
        )
        for p, g in zip(branch, new, strict=True):
            p.grad = g
    if control is not None:
        control.correct()
    optimizer.step()
    return parts


def masam_step(method, model, optimizer, batch, epoch, autocast, regulariser, control):
    """MASAM (Chen et al., ICLR 2026). Scores S_m = w D_m + (1 - w) c_m, with D_m the loss
    decay of m's unimodal loss (`optim.LossDecay`) and c_m the mean per-tensor cosine of m's
    unimodal and fused gradients; only the top-scoring modality's encoder is perturbed, along
    the unimodal gradient's projection on the fused one (the fused gradient where they
    conflict), eps = rho dir/||dir|| (x c when c > 0). At theta + eps a second pass gives the
    encoders their gradients; heads and the fusion head keep the first pass's. Regression: MSE
    for every loss. Adapted: plain (not |theta|-weighted, ASAM) radius, so `sam-rho` means
    what it means for SAM and SAGM; the ascent runs every `sam-every` steps as theirs does."""
    optimizer.zero_grad(set_to_none=True)
    params, g_mm, g_uni, parts = _split_gradients(method, model, batch, autocast, regulariser)
    _after_first_pass(method, parts, control)
    cfg, modalities = method.cfg, method.spec.modalities
    decay = method.decay.update({m: parts.get(f"mse_{m}", float("nan")) for m in modalities})
    branches = {m: model.encoder_parameters(m) for m in modalities}
    cos = {m: tensor_cosines([g_uni[p] for p in b], [g_mm[p] for p in b]) for m, b in branches.items()}  # fmt: skip
    score = {m: cfg.masam_weight * decay[m] + (1 - cfg.masam_weight) * cos[m] for m in modalities}
    chosen = max(modalities, key=lambda m: score[m])
    method.last_k = {m: float(m == chosen) for m in modalities}  # reported: 1 = perturbed
    if _ascent_step(method):
        branch = branches[chosen]
        direction = masam_direction([g_uni[p] for p in branch], [g_mm[p] for p in branch])
        rho = cfg.sam_rho * (cos[chosen] if cos[chosen] > 0 else 1.0)
        first = {p: p.grad for p in params}
        with sam_perturbation(branch, rho, direction=direction), frozen_buffers(model):
            optimizer.zero_grad(set_to_none=True)
            total(_objective(method, model, batch, autocast, regulariser)[0]).backward()
        in_branch = {p for b in branches.values() for p in b}
        for p in params:
            if p not in in_branch:  # heads, fusion head: the first pass's gradient
                p.grad = first[p]
    if control is not None:
        control.correct()
    optimizer.step()
    return parts


def _only(batch: Batch, modality: str, modalities: tuple[str, ...]) -> Batch:
    """The batch with every other modality marked absent (its branch is then not run)."""
    n = len(batch["md"])
    out = dict(batch)
    for m in modalities:
        has = batch.get(f"has_{m}", torch.ones(n, dtype=torch.bool, device=batch["md"].device))
        out[f"has_{m}"] = has if m == modality else torch.zeros_like(has)
    return out


def alternate_step(method, model, optimizer, batch, epoch, autocast, regulariser, control):
    """MLA (Zhang et al., CVPR 2024): for each modality in turn, its encoder and the one
    shared head take an optimiser step on that modality's loss alone, the shared head's input
    weight gradient projected away from what earlier steps fed it (`optim.HeadProjector`).
    There is no fused loss; the prediction is the weighted mean of the head's two outputs
    (`ensemble-oct-weight`). Regression: the head outputs MD and each loss is an MSE; the
    entropy-based test-time weights become fixed or inverse-training-MSE weights. After the
    step every parameter holds the gradient its own update used."""
    parts: dict[str, float] = {}
    used: dict[torch.nn.Parameter, torch.Tensor] = {}
    net = unwrapped(model)
    for m in method.spec.modalities:
        sub = _only(batch, m, method.spec.modalities)
        if not sub[f"has_{m}"].any():
            continue
        optimizer.zero_grad(set_to_none=True)
        terms, sub_parts, out = _objective(method, model, sub, autocast, regulariser)
        total(terms).backward()
        first = net.head(m)[0].weight
        if first.grad is not None and method.projector is not None:
            first.grad = method.projector.project(first.grad, out[f"z_{m}"][sub[f"has_{m}"]])
        if control is not None:
            control.observe()
            control.correct()
        optimizer.step()
        used.update({p: p.grad for p in model.parameters() if p.grad is not None})
        parts.update({k: v for k, v in sub_parts.items() if k.startswith("mse_")})
    for p, g in used.items():
        p.grad = g
    parts["mse"] = sum(parts.get(f"mse_{m}", 0.0) for m in method.spec.modalities)
    parts["loss"] = parts["mse"]
    method.scores.update({m: parts.get(f"mse_{m}", float("nan")) for m in method.spec.modalities})
    method._step_count += 1
    return parts


def shapley_prediction(method: Method, net: ReM3Dr, out: dict, y: torch.Tensor) -> torch.Tensor:
    """AGM (Li et al., ICCV 2023) in the objective: the fused prediction as
    phi_0 + phi_o + phi_f, the Shapley responses of the fusion head (phi_0 = the head with both
    modalities hidden), where "without modality m" is the learned absent-modality embedding, so
    the encoders run once (the note's cheap variant). The gradient through phi_m is scaled by
    k_m (`optim.ShapleyScores`), computed from this batch as AGM does. An eye without an image
    has that modality's phi = 0. The value is the fusion head's; only the gradient changes.
    Regression: scores are MSE(y, phi_0 + phi_m) / Var(y) instead of cross-entropies."""
    a, b = net.modalities
    has = {m: out[f"present_{m}"] for m in (a, b)}
    none = torch.zeros_like(has[a])

    def f(seen_a, seen_b):
        return net.fusion(net.fusion_input(out, {a: seen_a, b: seen_b})).squeeze(-1)

    f_ab, f_a, f_b, f_0 = f(has[a], has[b]), f(has[a], none), f(none, has[b]), f(none, none)
    phi = {a: 0.5 * ((f_ab - f_b) + (f_a - f_0)), b: 0.5 * ((f_ab - f_a) + (f_b - f_0))}
    var = method.target_var / net.md_scale**2  # of the normalised labels
    scores = {
        m: float(((y - full_precision(f_0 + phi[m])) ** 2).mean().detach()) / var for m in (a, b)
    }
    method.last_k = method.shapley.coefficients(scores, method.cfg.agm_alpha)
    k = method.last_k
    return f_0 + scale_gradient(phi[a], k[a]) + scale_gradient(phi[b], k[b])


def set_ensemble_weights(method: Method, model: torch.nn.Module) -> None:
    """UME, MLA: the prediction's head weights, fixed (`ensemble-oct-weight` in [0, 1]) or the
    inverse of each head's training MSE (the EMA `method.scores`), normalised to sum 1."""
    net = unwrapped(model)
    if not hasattr(net, "ensemble_weights"):
        return
    w = method.cfg.ensemble_oct_weight
    if w < 0:
        values = method.scores.values
        if len(values) < 2 or min(values.values()) <= 0:
            return
        inverse = [1.0 / values[m] for m in net.modalities]
        w = inverse[0] / sum(inverse)
    net.ensemble_weights.copy_(torch.tensor([w, 1.0 - w]))


def private_step(method, model, optimizer, batch, epoch, autocast, regulariser):
    """DP-SGD step: per-patient clip + noise (Opacus), then only post-processing.

    DP-SAT: the forward/backward runs at theta + rho u/||u|| where u is the previous step's
    noised gradient (already released), so the ascent costs no privacy. Modulation scales
    the noised gradient by coefficients from earlier noised gradients. FedProx's proximal
    term depends on no data and is added after the noise; its gradient is taken before the
    noised step, so a failure there releases nothing.
    """
    if not hasattr(optimizer, "pre_step"):
        raise PrivacyError(
            f"method {method.name} trains only under DP-SGD",
            "its optimiser is not Opacus' DPOptimizer",
            "train it with fit(), which wraps the model and optimiser",
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    rho = method.cfg.sam_rho if method.spec.update == "dpsat" else 0.0
    parts: dict[str, float] = {}
    if len(batch["md"]) == 0:  # an empty Poisson batch still releases noise: never skip it
        for p in params:
            p.grad_sample = p.new_zeros((0, *p.shape))
    else:
        with sam_perturbation(params, rho, direction=method._last_noisy):
            with autocast():
                loss, parts = method.loss(model, batch)
            loss.backward()
    prox = None
    if regulariser is not None:  # data-independent: at theta, before anything is released
        prox = torch.autograd.grad(regulariser(model), params, allow_unused=True)
    try:
        stepped = optimizer.pre_step()  # clip per patient, add noise, count the step
    except ValueError as err:  # Opacus: a trainable parameter got no per-sample gradient
        raise PrivacyError(
            "DP-SGD step failed", str(err), "every trainable parameter must be used by the loss"
        ) from None
    if not stepped:
        return parts
    if method.spec.update == "dpsat":
        method._last_noisy = [p.grad.detach().clone() for p in params]
        noise_std = optimizer.noise_multiplier * optimizer.max_grad_norm
        noise_std /= max(1, optimizer.expected_batch_size)
        method.scores.update(
            {
                m: 1.0 / branch_signal(unwrapped(model).encoder_parameters(m), noise_std)
                for m in method.spec.modalities
            }
        )
        if method.modulation_active(epoch):
            method.last_k = method.scores.coefficients(method.cfg.mod_alpha)
            for m, k in method.last_k.items():
                if k < 1.0:
                    scale_gradients(unwrapped(model).encoder_parameters(m), k)
    if prox is not None:
        for p, g in zip(params, prox, strict=True):
            if g is not None:
                p.grad.add_(g)
    optimizer.original_optimizer.step()
    if parts:  # an empty batch released noise only: there is no loss to report
        parts.update({f"k_{m}": k for m, k in method.last_k.items()})
    return parts
