"""Imbalanced-regression losses for the rare severe eyes: Balanced MSE, ConR and RankSim.

Each is an option of every fused method (config keys `fused-loss`, `conr-weight`,
`ranksim-weight`; off by default) and couples the rows of a batch, so none is allowed with a
private (DP-SGD) method. Written from the papers; the adaptations to MD regression are noted at
each function. LDS re-weighting (Yang et al. 2021) is `remdr.losses.lds_loss_weights`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONR_PUSH = 0.01  # ConR's e: a negative k dB away is pushed exp(e k) times harder (ConR default)


def bmc_loss(pred: torch.Tensor, target: torch.Tensor, sigma: float) -> torch.Tensor:
    """Balanced MSE, batch Monte-Carlo form (Ren et al., CVPR 2022).

    pred, target (B,) in the same units, sigma the label-noise scale in those units. With
    logits_ij = -(pred_i - target_j)^2 / (2 sigma^2), the loss is the cross-entropy of row i
    against column i, times 2 sigma^2 (so its gradient is on the MSE's scale). Each prediction
    is pulled to its own label and pushed from the batch's other labels, which undoes the
    training-label prior: frequent (normal) labels lose their pull on the rare eyes.
    Adapted: sigma is fixed (default the 1 dB perimetry noise), not learned.
    """
    pred, target = pred.float(), target.float()
    logits = -((pred[:, None] - target[None, :]) ** 2) / (2 * sigma**2)  # (B, B)
    labels = torch.arange(len(pred), device=pred.device)
    return F.cross_entropy(logits, labels) * (2 * sigma**2)


def conr_loss(
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    preds: torch.Tensor,
    *,
    omega: float,
    tau: float,
    anchor_weights: torch.Tensor | None = None,
    push: float = CONR_PUSH,
) -> torch.Tensor:
    """ConR (Keramati et al., ICLR 2024) on one view of the batch.

    embeddings (B, d); targets and preds (B,) in dB. For anchor i, positives are the other eyes
    with |y_i - y_j| <= omega; negatives are eyes whose label is farther than omega but whose
    *prediction* is within omega of i's (the collisions a rare eye suffers from the many). With
    s_ij = u_i . u_j / tau and pushing weight w_ik = a_i exp(push |y_i - y_k|),
    L_i = -1/|P(i)| sum_p log[ e^{s_ip} / (sum_{P(i)} e^{s_ij} + sum_{N(i)} w_ik e^{s_ik}) ].
    An anchor without a positive or without a negative contributes 0; the mean is over the
    batch. `anchor_weights` a_i (default 1) make rare anchors push harder (the paper's pushing
    power; remdr passes the LDS weights p(y)^-0.5). Adapted: one view per eye (ConR uses two
    augmentations), so the positives are other eyes of similar MD.
    """
    u = F.normalize(embeddings.float(), dim=-1)
    y, p = targets.float(), preds.detach().float()
    b = len(y)
    eye = torch.eye(b, dtype=torch.bool, device=u.device)
    dy = (y[:, None] - y[None, :]).abs()
    pos = (dy <= omega) & ~eye
    neg = (dy > omega) & ((p[:, None] - p[None, :]).abs() <= omega)
    a = torch.ones_like(y) if anchor_weights is None else anchor_weights.float()
    log_push = torch.log(a)[:, None] + push * dy  # log w_ik
    sim = u @ u.T / tau
    logits = (sim + log_push * neg).masked_fill(~(pos | neg), float("-inf"))
    active = pos.any(1) & neg.any(1)
    if not active.any():
        return sim.sum() * 0.0  # keeps the graph: nothing collides in this batch
    log_denom = torch.logsumexp(logits[active], dim=1, keepdim=True)
    log_prob = (sim[active] - log_denom).masked_fill(~pos[active], 0.0)
    per_anchor = -log_prob.sum(1) / pos[active].sum(1)
    return per_anchor.sum() / b


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its row, 0 = smallest, as floats (B, C)."""
    return x.argsort(dim=1).argsort(dim=1).to(x.dtype)


class _BlackboxRank(torch.autograd.Function):
    """Row-wise ranks with the blackbox-combinatorial gradient (Vlastelica et al., ICLR 2020):
    backward re-ranks x + lambda * grad and returns -(rank(x) - rank(x'))/lambda."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, lam: float) -> torch.Tensor:
        ranks = _ranks(x)
        ctx.save_for_backward(x, ranks)
        ctx.lam = lam
        return ranks

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, ranks = ctx.saved_tensors
        perturbed = _ranks(x + ctx.lam * grad)
        return -(ranks - perturbed) / ctx.lam, None


def ranksim_loss(embeddings: torch.Tensor, targets: torch.Tensor, lam: float) -> torch.Tensor:
    """RankSim (Gong et al., ICML 2022): the ranking of each eye's feature similarities should
    match the ranking of its label similarities.

    embeddings (B, d), targets (B,) in dB. S = cosine similarity matrix; for each row i, the MSE
    between rank(S_i)/B (differentiable through the blackbox rank, interpolation `lam`) and
    rank(-|y_i - y|)/B. Adapted: the batch is not subsampled to one eye per label (MD is
    continuous, so labels are almost never repeated).
    """
    u = F.normalize(embeddings.float(), dim=-1)
    y = targets.float()
    b = len(y)
    feature_ranks = _BlackboxRank.apply(u @ u.T, lam) / b
    label_ranks = _ranks(-(y[:, None] - y[None, :]).abs()) / b
    return F.mse_loss(feature_ranks, label_ranks)
