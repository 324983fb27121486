"""The output layers of the final model's heads refitted once training ends (`head-refit`):
ridge regression on the hidden activations of the training eyes, shrunk toward the trained
weights, the strength chosen on the validation eyes.

Why: in a federation each head is an average of heads fitted to their own sites' labels, chasing
encoders that move until the last round; under label skew the averaged output layer is biased
(CCVR, Luo et al. 2021, shows it for classifiers), and a unimodal head whose branch learned late
may never be fitted to it at all (the fundus head of `make sim` predicted the mean from features
that a least-squares fit reads at R² 0.5). With the encoders fixed, an output layer is a linear
model of its hidden activations, whose exact least-squares fit needs only sums: each site sends,
per head, the Gram matrix of its rows (`HeadStats`), and their sum is the pooled Gram (Fed3R, Fanì
et al. 2024, fits a classifier the same way). One more message per site, no training: the
coordinator fits what pooling the sites' eyes would. The strength runs from 0 (plain least
squares) to ∞ (the trained layer unchanged), and each head's validation Gram scores every
candidate exactly, so each choice is the pooled validation's. The fusion head's Gram also holds
the unimodal heads' activations, so `head-blend` is chosen after, exactly, for the refitted heads.

Rows, in the model's normalised units: the fusion head's are its complete eyes,
[h_fusion, h_<m> for each modality, 1, y]; a modality head's are the eyes with that image,
[h_<m>, 1, y] (an OCT-only site's eyes refit the OCT head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from remdr.head_blend import PROBES, Blend, choose, probe_key

TASK_KEY = "remdr-task"  # the config key of an evaluate message that asks for something else
HEAD_STATS = "head-stats"  # ... for the sums below, of the model it carries
SPLITS = ("train", "val")
FUSION = "fusion"
# the fewest eyes a site sums: the Gram of two rows gives both (up to their order; its constant
# column leaves no other freedom), of three or more it leaves a continuum of rows
MIN_EYES = 3
# ridge strengths, as multiples of the training eyes (the Gram grows with them); ∞ keeps the layer
STRENGTHS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)


@dataclass
class HeadStats:
    """Σ v vᵀ over one head's eyes (the module docstring's rows) and how many: what a site sends."""

    gram: np.ndarray  # (k, k) float64
    n: int

    def __add__(self, other: HeadStats) -> HeadStats:
        return HeadStats(self.gram + other.gram, self.n + other.n)


Sums = dict[str, HeadStats]  # head ("fusion", "oct", "fundus") -> its sums over one split


def add(a: Sums, b: Sums) -> Sums:
    return {head: a[head] + b[head] for head in a}


def withheld(sums: Sums) -> Sums:
    """`sums` with nothing in them where a group of fewer than `MIN_EYES` eyes could be read
    off: a head's own rows, or the difference of a modality head's and the fusion head's rows
    (the eyes with only that image). Such a split is sent empty, as a site without eyes would."""
    counts = [s.n for s in sums.values()]
    if FUSION in sums:
        counts += [sums[h].n - sums[FUSION].n for h in sums if h != FUSION]
    if all(n == 0 or n >= MIN_EYES for n in counts):
        return sums
    return {h: HeadStats(np.zeros_like(s.gram), 0) for h, s in sums.items()}


def to_arrays(sums: dict[str, Sums]) -> dict[str, np.ndarray]:
    """{split: {head: HeadStats}} as the named arrays of a reply."""
    out = {}
    for split, by_head in sums.items():
        for head, s in by_head.items():
            out[f"{split}-{head}-gram"] = s.gram
            out[f"{split}-{head}-n"] = np.array([s.n], dtype=np.int64)
    return out


def from_arrays(arrays: dict[str, np.ndarray], split: str, heads) -> Sums:
    return {
        h: HeadStats(np.asarray(arrays[f"{split}-{h}-gram"], np.float64),
                     int(arrays[f"{split}-{h}-n"][0]))
        for h in heads
    }  # fmt: skip


def sizes(model) -> dict[str, int]:
    """Each head's Gram size (rows as in the module docstring)."""
    width = {m: model.head(m)[-1].in_features for m in model.modalities}
    out = {m: width[m] + 2 for m in model.modalities}
    if getattr(model, "fusion", None) is not None:
        out[FUSION] = model.fusion[-1].in_features + sum(width.values()) + 2
    return out


def refittable(model: torch.nn.Module) -> bool:
    """A model whose predictions are its heads' outputs: its own head per modality (not MLA's
    shared one) and no learned gate mixing them."""
    return not getattr(model, "shared_head", False) and getattr(model, "gate", None) is None


@torch.no_grad()
def head_stats(model, loader, device: torch.device) -> Sums:
    """Each head's sums over `loader`'s eyes under `model` in eval mode (no augmentation)."""
    from remdr.methods import presence
    from remdr.runtime import to_device

    model.eval()
    grams = {h: np.zeros((k, k)) for h, k in sizes(model).items()}
    counts = dict.fromkeys(grams, 0)

    def accumulate(head: str, features: list[torch.Tensor], y: torch.Tensor) -> None:
        ones = torch.ones(len(y), 1, device=device)
        rows = torch.cat([*features, ones, y], 1).double()
        grams[head] += (rows.T @ rows).cpu().numpy()
        counts[head] += len(rows)

    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch.get("oct"), batch.get("fundus"), present=presence(batch))
        y = model.normalise(batch["md"].float())[:, None]
        hidden = {m: model.head(m)[:-1](out[f"z_{m}"].float()) for m in model.modalities}
        for m in model.modalities:
            keep = out[f"present_{m}"]
            if keep.any():
                accumulate(m, [hidden[m][keep]], y[keep])
        if FUSION in grams:
            keep = torch.stack([out[f"present_{m}"] for m in model.modalities]).all(0)
            if keep.any():
                fused = model.fusion[:-1](out["z"][keep].float())
                accumulate(FUSION, [fused, *(hidden[m][keep] for m in model.modalities)], y[keep])
    return {h: HeadStats(grams[h], counts[h]) for h in grams}


def split_sums(model, splits: dict, batch_size: int, device: torch.device) -> dict[str, Sums]:
    """`head_stats` of each named dataset (`{"train": ..., "val": ...}`), read in order."""
    from remdr.train import make_loader

    return {
        name: head_stats(
            model, make_loader(data, batch_size, shuffle=False, seed=0, device=device), device
        )
        for name, data in splits.items()
    }


@dataclass(frozen=True)
class Refit:
    """One head's choice."""

    strength: float  # λ / training eyes; ∞: the trained layer kept
    weight: np.ndarray  # the output layer's weights, then its bias
    val_mse_before: float  # dB², the trained layer on this head's validation eyes
    val_mse: float  # dB², the chosen one
    val_eyes: int

    def to_dict(self) -> dict:
        return {
            "strength": self.strength if math.isfinite(self.strength) else "inf",
            "val-mse-before": self.val_mse_before,
            "val-mse": self.val_mse,
            "val-eyes": self.val_eyes,
        }


def _mse(val: HeadStats, coef: np.ndarray, scale: float) -> float:
    """The mean of (v · coef)² over the validation rows, in dB² (coef's last entry is y's: -1)."""
    return float(coef @ val.gram @ coef) / max(val.n, 1) * scale * scale


def _coef(k: int, cols: list[int], weight: np.ndarray) -> np.ndarray:
    """A prediction with `weight` on columns `cols`, minus y."""
    coef = np.zeros(k)
    coef[cols] += weight
    coef[-1] = -1.0
    return coef


def refit_layer(
    train: HeadStats, val: HeadStats, cols: list[int], trained: np.ndarray, scale: float
) -> Refit:
    """The layer on columns `cols` (its features, then the constant) with the lowest
    validation MSE over `STRENGTHS`: ridge on the training Gram toward `trained`,
    λ = strength × training rows."""
    k, p = train.gram.shape[0], len(cols)
    features, target = train.gram[np.ix_(cols, cols)], train.gram[cols, -1]
    if val.n == 0:  # nothing to choose on: the trained layer
        return Refit(math.inf, trained, math.nan, math.nan, 0)
    before = _mse(val, _coef(k, cols, trained), scale)
    best = Refit(math.inf, trained, before, before, val.n)
    if train.n == 0 or not np.isfinite(before) or before < 0:
        return best
    for strength in STRENGTHS[:-1]:
        lam = strength * train.n
        # the tiny jitter makes plain least squares solvable where a hidden unit never varies
        a = features + (lam + 1e-9 * np.trace(features) / p) * np.eye(p)
        try:
            weight = np.linalg.solve(a, target + lam * trained)
        except np.linalg.LinAlgError:  # a sum no eyes could give (screening bounds it): skip
            continue
        mse = _mse(val, _coef(k, cols, weight), scale)
        # a Gram scores every layer >= 0: a negative score is a sum no eyes could give
        if np.isfinite(mse) and 0 <= mse < best.val_mse - 1e-9:
            best = Refit(strength, weight, before, mse, val.n)
    return best


@dataclass
class HeadRefit:
    """Every head's refit, the blend chosen after them, and what the result scores."""

    heads: dict[str, Refit]
    blend: Blend | None
    # dB², the refitted model on every validation eye it predicts (a complete eye by the fusion
    # head and the blend, an eye with one image by that image's head); NaN where the Grams
    # cannot tell (no validation eyes, or an ensemble's weighted heads)
    val_mse: float = math.nan

    def to_dict(self) -> dict:
        return {h: r.to_dict() for h, r in self.heads.items()}


def refit_heads(model, train: Sums, val: Sums, *, blend: bool) -> HeadRefit:
    """Refit each head of `model` from the summed Grams (each modality head first, then the
    fusion head), write the chosen layers into the model, and with `blend` choose `head-blend`
    for the refitted heads on the fusion head's validation Gram."""
    scale = model.md_scale
    width = {m: model.head(m)[-1].in_features for m in model.modalities}
    chosen = {}
    for m in model.modalities:
        chosen[m] = refit_layer(
            train[m], val[m], [*range(width[m]), width[m]], output_layer(model.head(m)), scale
        )
        set_output_layer(model.head(m), chosen[m].weight)
    if FUSION not in train:  # one modality's head predicts every eye; an ensemble mixes heads
        only = next(iter(chosen.values())).val_mse if len(chosen) == 1 else math.nan
        return HeadRefit(chosen, None, only)
    k = train[FUSION].gram.shape[0]
    fused_width, ones = model.fusion[-1].in_features, k - 2
    chosen[FUSION] = refit_layer(
        train[FUSION], val[FUSION], [*range(fused_width), ones], output_layer(model.fusion), scale
    )
    set_output_layer(model.fusion, chosen[FUSION].weight)
    fused = _coef(k, [*range(fused_width), ones], chosen[FUSION].weight)
    heads, start = {}, fused_width  # each modality head's coefficients on the fusion Gram
    for m in model.modalities:
        heads[m] = _coef(k, [*range(start, start + width[m]), ones], chosen[m].weight)
        start += width[m]
    picked = None
    if blend:
        metrics = {"mse": _mse(val[FUSION], fused, scale)}
        for m, head in heads.items():
            for w in PROBES:
                metrics[probe_key(m, w)] = _mse(val[FUSION], (1 - w) * fused + w * head, scale)
        picked = choose(metrics, tuple(model.modalities))
    complete = picked.mse if picked is not None else chosen[FUSION].val_mse
    return HeadRefit(chosen, picked, _model_mse(val, chosen, heads, complete, scale))


def _model_mse(
    val: Sums, chosen: dict[str, Refit], on_fusion: dict[str, np.ndarray], complete: float,
    scale: float,
) -> float:  # fmt: skip
    """The validation MSE over every eye of a two-branch model: the complete eyes' (`complete`,
    dB²) and, for each modality, its head's squared errors on all its eyes less those on the
    complete eyes (its columns of the fusion Gram, `on_fusion`): the eyes with that image alone.
    NaN where the sums contradict each other (fewer eyes with an image than complete eyes, a
    negative sum of squares): no eyes could give them."""
    n = n_complete = val[FUSION].n
    sse = complete / (scale * scale) * n_complete if n_complete else 0.0
    for m, coef in on_fusion.items():
        alone, k = val[m].n - n_complete, val[m].gram.shape[0]
        if alone < 0:
            return math.nan
        if alone > 0:
            own = _coef(k, list(range(k - 1)), chosen[m].weight)
            sse += float(own @ val[m].gram @ own) - float(coef @ val[FUSION].gram @ coef)
            n += alone
    return sse / n * scale * scale if n and sse >= 0 else math.nan


def output_layer(head: torch.nn.Module) -> np.ndarray:
    """A head's output layer as (weights, bias)."""
    last = head[-1]
    return np.concatenate([last.weight.detach().double().view(-1).cpu().numpy(),
                           last.bias.detach().double().cpu().numpy()])  # fmt: skip


def set_output_layer(head: torch.nn.Module, weight: np.ndarray) -> None:
    last = head[-1]
    with torch.no_grad():
        last.weight.copy_(torch.as_tensor(weight[:-1]).view_as(last.weight))
        last.bias.copy_(torch.as_tensor(weight[-1:]).view_as(last.bias))
