"""Losses: MSE, the label density (LDS) and the adaptive-margin supervised contrastive loss.

The contrastive loss is this project's reconstruction of the idea in Re-M3Dr
(arXiv 2605.26513), which gives no formulas. For an anchor i with embedding u_i (unit norm):

* positives P(i) = {j != i : |y_i - y_j| <= delta}, negatives N(i) = the rest;
* s_ij = u_i . u_j / tau;
* margin on negatives m_ij = (mu / tau) * w_i * min(1, (|y_i - y_j| - delta) / span), where
  w_i = p(y_i)^(-gamma) from the LDS-smoothed training label density, normalised to batch mean 1
  and clipped, so rare (severe) anchors and far-away negatives are pushed apart harder;
* L_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip) / sum_{a != i} exp(s_ia + m_ia [a in N(i)]) ).

Anchors without positives are skipped; with mu = 0 this is plain SupCon (Khosla et al. 2020).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

DENSITY_RANGE = (-40.0, 10.0)  # dB, the valid MD range
DENSITY_BIN = 0.5  # dB


@dataclass
class LabelDensity:
    """LDS (Yang et al. 2021): the training-label histogram convolved with a Gaussian kernel.

    Fitted once on the training labels; `values` is a density over fixed 0.5 dB bins.
    """

    values: np.ndarray  # (n_bins,) density, integrates to 1 over DENSITY_RANGE

    @classmethod
    def fit(cls, targets: np.ndarray, sigma: float) -> LabelDensity:
        edges = np.arange(DENSITY_RANGE[0], DENSITY_RANGE[1] + DENSITY_BIN, DENSITY_BIN)
        hist, _ = np.histogram(np.clip(targets, *DENSITY_RANGE), bins=edges)
        half = int(np.ceil(3 * sigma / DENSITY_BIN))
        offsets = np.arange(-half, half + 1) * DENSITY_BIN
        kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
        smooth = np.convolve(hist.astype(np.float64), kernel / kernel.sum(), mode="same")
        smooth = smooth + 1e-6 * max(1, len(targets))  # no zero density in empty regions
        return cls(values=smooth / (smooth.sum() * DENSITY_BIN))

    @classmethod
    def uniform(cls) -> LabelDensity:
        n = int(round((DENSITY_RANGE[1] - DENSITY_RANGE[0]) / DENSITY_BIN))
        return cls(values=np.full(n, 1.0 / (DENSITY_RANGE[1] - DENSITY_RANGE[0])))

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        idx = ((y.detach().float() - DENSITY_RANGE[0]) / DENSITY_BIN).long()
        idx = idx.clamp(0, len(self.values) - 1)
        return torch.as_tensor(self.values, dtype=torch.float32, device=y.device)[idx]


def lds_loss_weights(
    density: LabelDensity, y: torch.Tensor, power: float, clip: float, norm: float = 1.0
) -> torch.Tensor:
    """LDS re-weighting (Yang et al. 2021): w = p(y)^-power / norm, clipped at `clip` so one
    rare eye cannot dominate a batch. `norm` is the training labels' mean of p(y)^-power
    (`lds_norm`), so the training set's mean weight is 1 and the loss keeps its scale."""
    w = density(y).clamp_min(1e-12) ** (-power) / norm
    return w.clamp(max=clip)


def lds_norm(density: LabelDensity, targets: np.ndarray, power: float) -> float:
    """The mean of p(y)^-power over the training labels (1 for none)."""
    if not len(targets):
        return 1.0
    y = torch.as_tensor(np.asarray(targets, dtype=np.float32))
    return float(lds_loss_weights(density, y, power, clip=float("inf")).mean())


def anchor_weights(
    density: LabelDensity, y: torch.Tensor, gamma: float, clip: float
) -> torch.Tensor:
    """w_i = p(y_i)^-gamma, normalised to batch mean 1, then clipped at `clip`."""
    w = density(y).clamp_min(1e-12) ** (-gamma)
    return (w / w.mean()).clamp(max=clip)


def negative_margins(
    targets: torch.Tensor,
    density: LabelDensity,
    *,
    delta: float,
    tau: float,
    mu: float,
    gamma: float,
    span: float,
    weight_clip: float,
    candidates: torch.Tensor | None = None,
) -> torch.Tensor:
    """m_ij = (mu/tau) w_i min(1, (|y_i - y_j| - delta)/span) for negatives, 0 elsewhere.
    (B, C): anchors by candidates, the batch itself unless `candidates` labels are given."""
    y = targets.float()
    keys = y if candidates is None else candidates.float()
    dist = (y[:, None] - keys[None, :]).abs()
    w = anchor_weights(density, y, gamma, weight_clip)  # (B,)
    margin = (mu / tau) * w[:, None] * ((dist - delta) / span).clamp(0.0, 1.0)
    return margin * (dist > delta)


def adaptive_margin_supcon(
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    *,
    density: LabelDensity,
    delta: float = 1.0,
    tau: float = 0.1,
    mu: float = 0.5,
    gamma: float = 0.5,
    span: float = 10.0,
    weight_clip: float = 5.0,
    memory: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """embeddings (B, d), targets (B,) in dB -> scalar loss (0 if no anchor has a positive).

    `memory` = (unit embeddings (M, d), targets (M,)) of earlier training eyes, detached: extra
    candidates (positives and negatives) for each anchor, so a small batch still has positives
    (a cross-batch memory, XBM: Wang et al., CVPR 2020). The anchors are the batch's only."""
    u = F.normalize(embeddings.float(), dim=-1)
    y = targets.float()
    b = u.shape[0]
    keys, key_y = u, y
    if memory is not None and len(memory[1]):
        keys = torch.cat([u, memory[0].to(u)])
        key_y = torch.cat([y, memory[1].to(y)])
    self_pair = torch.zeros(b, len(key_y), dtype=torch.bool, device=u.device)
    self_pair[:, :b] = torch.eye(b, dtype=torch.bool, device=u.device)
    dist = (y[:, None] - key_y[None, :]).abs()  # (B, C) label distance in dB
    pos = (dist <= delta) & ~self_pair
    neg = ~pos & ~self_pair
    sim = u @ keys.T / tau  # (B, C)
    margin = negative_margins(
        y, density, delta=delta, tau=tau, mu=mu, gamma=gamma, span=span,
        weight_clip=weight_clip, candidates=key_y,
    )  # fmt: skip
    logits = (sim + margin * neg).masked_fill(self_pair, float("-inf"))
    log_denom = torch.logsumexp(logits, dim=1, keepdim=True)  # (B, 1)
    log_prob = sim - log_denom
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return sim.sum() * 0.0  # keeps the graph; nothing to contrast in this batch
    per_anchor = -(log_prob.masked_fill(~pos, 0.0)).sum(1) / n_pos.clamp_min(1)
    return per_anchor[has_pos].mean()


class EmbeddingMemory:
    """The last `size` (unit embedding, label) pairs a training pushed: SupCon's cross-batch
    candidates. It holds features of private images, so it lives where the training runs (a
    site's memory never leaves the site) and is rebuilt by every training."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.u: torch.Tensor | None = None  # (M, d)
        self.y: torch.Tensor | None = None  # (M,)

    def push(self, embeddings: torch.Tensor, targets: torch.Tensor) -> None:
        if self.size <= 0 or not len(targets):
            return
        u = F.normalize(embeddings.detach().float(), dim=-1)
        y = targets.detach().float()
        if self.u is not None:
            u, y = torch.cat([self.u, u]), torch.cat([self.y, y])
        self.u, self.y = u[-self.size :], y[-self.size :]

    def get(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.u is None else (self.u, self.y)


def prototype_bins(width: float) -> torch.Tensor:
    """Centres of the fixed MD bins (dB) the prototypes stand for; fixed, never data-derived."""
    lo, hi = DENSITY_RANGE
    n = int(np.ceil((hi - lo) / width))
    return torch.tensor([lo + (i + 0.5) * width for i in range(n)], dtype=torch.float32)


def prototype_margin_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    centres: torch.Tensor,
    *,
    tau: float,
    mu: float,
    span: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-example contrastive loss against learnable MD-bin prototypes (the DP-safe SupCon).

    `logits` are u_i . p_k (unit-norm embedding against prototype k). The positive is the bin
    holding y_i; every other bin is a negative with margin (mu / tau) min(1, |c_k - y_i| / span),
    so far-away bins are pushed apart harder. The margin depends only on the example's own label
    and fixed bin centres, and the loss of row i only on row i: one patient's replacement changes
    no other row's gradient, which is what DP-SGD's per-example clipping assumes.
    Returns the mean over the batch; rows where `mask` is false count as zero (their
    modality is absent), and the mean stays over the whole batch so no row scales another.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32  # fp64: the check
    centres, logits = centres.to(logits.device, dtype), logits.to(dtype)
    y = targets.to(dtype).clamp(*DENSITY_RANGE)
    positive = torch.bucketize(y, (centres[:-1] + centres[1:]) / 2)  # (B,)
    distance = (centres[None, :] - y[:, None]).abs()
    margin = (mu / tau) * (distance / span).clamp(max=1.0)
    margin = margin.scatter(1, positive[:, None], 0.0)
    per_row = F.cross_entropy(logits / tau + margin, positive, reduction="none")
    return per_row.mean() if mask is None else (per_row * mask.to(per_row.dtype)).mean()
