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
