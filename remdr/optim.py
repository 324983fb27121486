"""Update rules shared by the methods: gradient modulation (OGM-GE style), SAM's two passes, and
the federated site's corrections (FedProx's proximal term, SCAFFOLD's control variates).

Sharpness-aware gradient modulation (SAGM) is this project's reconstruction of Re-M3Dr's idea:
1. backward the full loss -> g;
2. modality scores s_m = EMA of each unimodal head's MSE; the weaker modality w has the larger
   score, r = s_w / s_d >= 1, and the dominant branch gets k_d = 1 - tanh(alpha (r - 1)), k_w = 1;
3. SAM: eps = rho g / ||g||, move to theta + eps, forward/backward again -> g', restore theta
   exactly (copied back, not subtracted) with norm-layer running statistics left as after pass 1;
4. scale the dominant branch's g' by k_d (optionally add OGM-GE noise) and step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class ModalityScores:
    """EMA of each modality's unimodal MSE; a higher score means a weaker modality."""

    def __init__(self, modalities: tuple[str, ...], decay: float) -> None:
        self.modalities, self.decay = modalities, decay
        self.values: dict[str, float] = {}

    def update(self, losses: dict[str, float]) -> None:
        for m in self.modalities:
            if m not in losses or not math.isfinite(losses[m]):
                continue
            old = self.values.get(m)
            self.values[m] = (
                losses[m] if old is None else self.decay * old + (1 - self.decay) * losses[m]
            )

    def coefficients(self, alpha: float) -> dict[str, float]:
        """k per modality: 1 for the weaker, 1 - tanh(alpha (r - 1)) for the dominant."""
        k = {m: 1.0 for m in self.modalities}
        if len(self.values) < 2 or len(self.modalities) < 2:
            return k
        weak = max(self.modalities, key=lambda m: self.values[m])
        dom = min(self.modalities, key=lambda m: self.values[m])
        if weak == dom or self.values[dom] <= 0:
            return k
        r = self.values[weak] / self.values[dom]
        k[dom] = 1.0 - math.tanh(alpha * (r - 1.0))
        return k

    def state_dict(self) -> dict:
        return {
            "modalities": list(self.modalities),
            "decay": self.decay,
            "values": dict(self.values),
        }

    def load_state_dict(self, state: dict) -> None:
        if tuple(state.get("modalities", ())) != self.modalities:
            raise ValueError(
                f"scores are for {state.get('modalities')}, not {list(self.modalities)}"
            )
        self.values = {
            m: float(v) for m, v in state.get("values", {}).items() if m in self.modalities
        }


def scale_gradients(
    params: list[nn.Parameter], k: float, noise: bool = False, gen: torch.Generator | None = None
) -> None:
    """g <- k g (+ N(0, std(g)^2) per tensor when `noise`, as OGM-GE's generalisation enhancement)."""
    for p in params:
        if p.grad is None:
            continue
        p.grad.mul_(k)
        if noise and p.grad.numel() > 1:
            std = p.grad.float().std()
            eps = torch.randn(p.grad.shape, generator=gen, device="cpu").to(p.grad)
            p.grad.add_(eps * std.to(p.grad))


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Run a pass whose running statistics (BatchNorm means, variances, counters) are discarded."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, copy in saved:
                b.copy_(copy)


@contextmanager
def sam_perturbation(
    params: list[nn.Parameter], rho: float, direction: list[torch.Tensor] | None = None
) -> Iterator[None]:
    """Move to theta + rho u/||u|| for the body of the block, then restore theta exactly.

    u is each parameter's current gradient (SAM) or the given `direction` (DP-SAT passes the
    previous step's noised gradient); without either, or with rho = 0, theta does not move.
    """
    if direction is None:
        direction = [p.grad for p in params]
    if rho <= 0 or all(d is None for d in direction):
        yield
        return
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
        norm = torch.stack([d.float().norm() for d in direction if d is not None]).norm()
        scale = rho / (float(norm) + 1e-12)
        for p, d in zip(params, direction, strict=True):
            if d is not None:
                p.add_(d, alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup, strict=True):
                p.copy_(b)


def branch_signal(params: list[nn.Parameter], noise_std: float) -> float:
    """RMS gradient of a branch with the DP noise's variance subtracted (floored above zero):
    an estimate of the un-noised gradient's size read only from the noised one."""
    total = sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None)
    count = sum(p.numel() for p in params if p.grad is not None)
    signal = total / max(1, count) - noise_std**2
    return math.sqrt(max(signal, 1e-3 * noise_std**2 + 1e-12))


def proximal_term(model: nn.Module, anchor: dict[str, torch.Tensor], mu: float):
    """FedProx: (mu / 2) * ||theta - theta_global||^2 over `model`'s trainable parameters.

    `anchor` is keyed by `model`'s parameter names; the pairs are matched once, here, and then
    held by identity, so the term is the same whatever wraps `model` when it is evaluated (Opacus'
    GradSampleModule prefixes every name with `_module.`). The returned `term(wrapper)` ignores
    its argument. An anchor that matches no trainable parameter is an error, not a zero term.
    """
    pairs = [
        (p, anchor[name])
        for name, p in model.named_parameters()
        if p.requires_grad and name in anchor
    ]
    if not pairs:
        raise ValueError("the FedProx anchor matches none of the model's trainable parameters")

    def term(_model: nn.Module | None = None) -> torch.Tensor:
        total = torch.zeros((), device=pairs[0][0].device)
        for p, a in pairs:
            total = total + (p - a).pow(2).sum()
        return 0.5 * mu * total

    return term


class DriftControl:
    """SCAFFOLD's control variates at one site (Karimireddy et al., ICML 2020), for an AdamW
    site optimiser.

    Under label skew each site's gradient pulls the shared model towards its own label mix (a
    severe-heavy clinic pushes every output down), and averaging those pulls cancels the
    learning it was meant to add. SCAFFOLD adds `c - c_i` to every local gradient before the
    optimiser step: the site's own mean gradient c_i out, the federation's c in, so a site
    steps as if it saw everyone's data. Adapted here: c_i is the mean of the site's raw
    (first-pass, uncorrected) minibatch gradients over its local steps of the round, instead
    of SCAFFOLD's (x - y)/(K lr), which presumes plain SGD steps. Per parameter: a parameter no
    step reached (an absent modality's branch) keeps its c_i.
    """

    def __init__(
        self,
        model: nn.Module,
        server: dict[str, torch.Tensor] | None,
        local: dict[str, torch.Tensor] | None,
    ) -> None:
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        zeros = {n: torch.zeros_like(p, memory_format=torch.contiguous_format) for n, p in self.params.items()}  # fmt: skip
        self.server = {n: (server or {}).get(n, z).to(z) for n, z in zeros.items()}
        self.local = {n: (local or {}).get(n, z).to(z) for n, z in zeros.items()}
        self._sums = {n: torch.zeros_like(z) for n, z in zeros.items()}
        self._counts = dict.fromkeys(zeros, 0)

    def observe(self) -> None:
        """Add this step's raw gradients (before any correction) to the round's mean."""
        for n, p in self.params.items():
            if p.grad is not None:
                self._sums[n].add_(p.grad.detach().float())
                self._counts[n] += 1

    def correct(self) -> None:
        """g <- g + c - c_i on every parameter this step has a gradient for."""
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.add_((self.server[n] - self.local[n]).to(p.grad.dtype))

    def updated_local(self) -> dict[str, torch.Tensor]:
        """c_i after this round: the mean raw gradient, or the old c_i where none was seen."""
        return {
            n: (self._sums[n] / self._counts[n] if self._counts[n] else self.local[n]).cpu()
            for n in self.params
        }


# -- the multimodal baselines' update rules (wired in `remdr.update_rules`) -----------------------


def _flat(grads: list[torch.Tensor | None], like: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).float().reshape(-1) for g, p in zip(grads, like, strict=True)]
    )  # fmt: skip


def pareto_weights(g_mm: torch.Tensor, g_m: torch.Tensor, eps: float = 1e-3) -> tuple[float, float]:
    """MMPareto (Wei & Hu, ICML 2024): the weights (a1, a2) of one encoder's fused-loss and
    unimodal-loss gradients (flattened). Aligned (cosine > 0): (1/2, 1/2). Conflicting: the
    two-task min-norm (MGDA) point, a1 = ((g_m - g_mm) . g_m) / ||g_mm - g_m||^2 clipped to
    [eps, 1 - eps], whose combination has a non-negative inner product with both gradients."""
    denom = float((g_mm - g_m).pow(2).sum())
    if float(g_mm @ g_m) > 0 or denom <= 0:
        return 0.5, 0.5
    a1 = min(max(float((g_m - g_mm) @ g_m) / denom, eps), 1 - eps)
    return a1, 1.0 - a1


def pareto_gradients(
    params: list[nn.Parameter],
    g_mm: list[torch.Tensor | None],
    g_m: list[torch.Tensor | None],
    gamma: float,
) -> list[torch.Tensor]:
    """One encoder's MMPareto gradient, per tensor: 2 (a1 g_mm + a2 g_m), raised to the norm of
    the plain sum g_mm + g_m where that is larger ("magnitude enhancement"), times gamma."""
    a1, a2 = pareto_weights(_flat(g_mm, params), _flat(g_m, params))
    out = []
    for p, gf, gu in zip(params, g_mm, g_m, strict=True):
        gf = torch.zeros_like(p) if gf is None else gf
        gu = torch.zeros_like(p) if gu is None else gu
        combined = 2 * (a1 * gf + a2 * gu)
        plain, norm = float((gf + gu).norm()), float(combined.norm())
        if plain > norm > 0:
            combined = combined * (plain / norm)
        out.append(gamma * combined)
    return out


class LossDecay:
    """MASAM's loss decay per modality: D_m = max(0, l_m(t-1) - EMA(l_m)(t)), how much faster
    than its average a modality's unimodal loss is falling."""

    def __init__(self, modalities: tuple[str, ...], decay: float) -> None:
        self.modalities, self.decay = modalities, decay
        self.ema: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def update(self, losses: dict[str, float]) -> dict[str, float]:
        out = {}
        for m in self.modalities:
            loss = losses.get(m, float("nan"))
            if not math.isfinite(loss):
                out[m] = 0.0
                continue
            old = self.ema.get(m)
            self.ema[m] = loss if old is None else self.decay * old + (1 - self.decay) * loss
            out[m] = 0.0 if old is None else max(0.0, self.last[m] - self.ema[m])
            self.last[m] = loss
        return out

    def state_dict(self) -> dict:
        return {"ema": dict(self.ema), "last": dict(self.last)}

    def load_state_dict(self, state: dict) -> None:
        self.ema = {m: float(v) for m, v in state.get("ema", {}).items() if m in self.modalities}
        self.last = {m: float(v) for m, v in state.get("last", {}).items() if m in self.modalities}


def tensor_cosines(a: list[torch.Tensor | None], b: list[torch.Tensor | None]) -> float:
    """Mean over tensors of cos(a_t, b_t) (MASAM's gradient agreement of one encoder)."""
    cos = [
        float(torch.nn.functional.cosine_similarity(x.reshape(1, -1).float(), y.reshape(1, -1).float()))
        for x, y in zip(a, b, strict=True)
        if x is not None and y is not None and x.norm() > 0 and y.norm() > 0
    ]  # fmt: skip
    return sum(cos) / len(cos) if cos else 0.0


def masam_direction(
    g_uni: list[torch.Tensor | None], g_mm: list[torch.Tensor | None]
) -> list[torch.Tensor | None]:
    """MASAM's ascent direction for the selected encoder, per tensor: the projection of the
    unimodal gradient on the fused one where they agree, the fused gradient where they conflict."""
    out: list[torch.Tensor | None] = []
    for gu, gf in zip(g_uni, g_mm, strict=True):
        if gf is None or gu is None or float(gf.norm()) == 0:
            out.append(gf)
            continue
        dot = float((gu.float() * gf.float()).sum())
        out.append(gf * (dot / float(gf.float().pow(2).sum())) if dot >= 0 else gf)
    return out


class HeadProjector:
    """MLA's gradient modification (Zhang et al., CVPR 2024, after orthogonal weight
    modification): a projector P (d, d), from the identity, that each unimodal step shrinks
    along the batch-mean head input r (P <- P - P r r^T P / (alpha + r^T P r), then scaled to
    Frobenius norm 1); the shared head's first weight gradient becomes grad_W P^T, so a step for
    one modality changes the head little along the inputs the other modality gave it.
    Adapted: alpha is fixed (the code decays it from 0.1 to 0.01 over each epoch)."""

    def __init__(self, dim: int, alpha: float = 0.1) -> None:
        self.P = torch.eye(dim)
        self.alpha = alpha

    @torch.no_grad()
    def project(self, weight_grad: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Update P with `features` (B, d) of this step, then return weight_grad (h, d) @ P^T."""
        p = self.P.to(features.device)
        r = features.detach().float().mean(0, keepdim=True).T  # (d, 1)
        k = p @ r
        p = p - (k @ k.T) / (self.alpha + float(r.T @ k))
        self.P = p / p.norm()
        return (weight_grad.float() @ self.P.T).to(weight_grad.dtype)


class ShapleyScores:
    """AGM (Li et al., ICCV 2023) adapted to regression: each modality's Shapley response phi_m
    scores s_m = MSE(y, phi_0 + phi_m) / Var(y); with r_m = exp(s_other - s_m) now and
    rbar_m = exp(Sbar_other - Sbar_m) from the running means Sbar of all earlier scores, the
    gradient through phi_m is scaled by k_m = exp(alpha min(rbar_m - r_m, 10)): a modality
    learning faster than its history is slowed, a lagging one sped up."""

    def __init__(self, modalities: tuple[str, ...]) -> None:
        self.modalities = modalities
        self.means: dict[str, float] = {}
        self.count = 0

    def coefficients(self, scores: dict[str, float], alpha: float) -> dict[str, float]:
        """k per modality from this batch's `scores`, then the running means take them in."""
        a, b = self.modalities
        k = {a: 1.0, b: 1.0}
        if self.means:
            for m, other in ((a, b), (b, a)):
                ratio = math.exp(scores[other] - scores[m])
                target = math.exp(self.means[other] - self.means[m])
                k[m] = math.exp(alpha * min(target - ratio, 10.0))
        self.count += 1
        for m in self.modalities:
            old = self.means.get(m, scores[m])
            self.means[m] = old + (scores[m] - old) / self.count
        return k

    def state_dict(self) -> dict:
        return {"means": dict(self.means), "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.means = {m: float(v) for m, v in state.get("means", {}).items()}
        self.count = int(state.get("count", 0))


def scale_gradient(x: torch.Tensor, k: float) -> torch.Tensor:
    """x forward, k * grad backward."""
    return x * k + x.detach() * (1.0 - k)
