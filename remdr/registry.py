"""The method registry: every method's name and what it is made of, without torch.

A method is an objective plus an update rule run by the one training loop (`remdr.methods`
implements both from the flags of its `MethodSpec`). The registry holds only the specs, so a
config can be checked against the method names (`TrainConfig.method`) without importing torch,
and `remdr-train --list-methods` lists them. A new method is a `MethodSpec` here (its loss in
`remdr.losses`, its objective in `remdr.methods`, its update rule an `update` kind in
`remdr.update_rules`); the registry-driven tests in `tests/test_methods.py` pick it up.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from remdr.errors import ConfigError

MODALITIES = ("oct", "fundus")  # the two imaging branches, in the model's order
UPDATES = ("plain", "modulate", "sam", "sagm", "dpsat", "pareto", "masam", "alternate", "agm")
FUSIONS = ("mlp", "ensemble")  # concat -> MLP, or the weighted mean of the unimodal heads


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    modalities: tuple[str, ...] = MODALITIES
    unimodal_loss: bool = False  # unimodal heads train the encoders (else they are probes)
    contrastive: bool = False
    update: str = "plain"  # one of UPDATES
    ogm_noise: bool = False
    prototypes: bool = False  # per-example contrastive loss against MD-bin prototypes
    private: bool = False  # trains only under DP-SGD, one row per patient
    fusion: str = "mlp"  # one of FUSIONS; "ensemble" has no fused loss, only the heads'
    shared_head: bool = False  # one unimodal head serves every modality (MLA)
    uni_weight: float | None = None  # fixed weight of the unimodal losses; None: lambda-uni


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.update not in UPDATES:
        raise ValueError(f"unknown update rule {spec.update!r}")
    if spec.fusion not in FUSIONS:
        raise ValueError(f"unknown fusion {spec.fusion!r}")
    two_losses = spec.update in ("pareto", "masam", "alternate")
    if two_losses and not (spec.unimodal_loss and len(spec.modalities) == 2):
        raise ValueError(f"update {spec.update!r} needs both modalities' heads as losses")
    if spec.private and (spec.contrastive or spec.update not in ("plain", "dpsat")):
        raise ValueError(  # these couple rows or read private labels outside DP-SGD
            f"private method {spec.name!r} may not use in-batch SupCon (with its label density), "
            "SAM or loss-based modulation: use prototypes and dpsat"
        )
    _REGISTRY[spec.name] = spec
    return spec


def list_methods(private: bool | None = None) -> list[str]:
    """Registered names; `private=False` only the non-DP ones, `True` only the DP ones."""
    return [n for n, s in _REGISTRY.items() if private is None or s.private == private]


def get_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown method '{name}'", f"{hint}valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


for _spec in (
    MethodSpec("oct", "unimodal baseline: OCT branch only", modalities=("oct",)),
    MethodSpec("fundus", "unimodal baseline: fundus branch only", modalities=("fundus",)),
    MethodSpec("concat", "naive late fusion (concat -> MLP), MSE"),
    MethodSpec(
        "ogm_ge", "OGM-GE (CVPR 2022) adapted to regression", update="modulate", ogm_noise=True
    ),
    MethodSpec("sam", "late fusion trained with plain SAM", update="sam"),
    MethodSpec(
        "remdr",
        "Re-M3Dr: adaptive-margin SupCon + SAGM",
        unimodal_loss=True,
        contrastive=True,
        update="sagm",
    ),
    MethodSpec(
        "remdr_no_con", "Re-M3Dr without the contrastive loss", unimodal_loss=True, update="sagm"
    ),
    MethodSpec(
        "remdr_no_sagm", "Re-M3Dr without SAGM (plain step)", unimodal_loss=True, contrastive=True
    ),
    # the multimodal baselines of issue 24 (docs/method.md, "Baselines"; sources in each rule)
    MethodSpec(
        "multitask",
        "late fusion + unimodal MSE losses, plain step (MMPareto's uniform)",
        unimodal_loss=True,
    ),
    MethodSpec(
        "ume",
        "UME (Du et al. ICML 2023): two unimodal models, weighted mean at prediction",
        unimodal_loss=True,
        fusion="ensemble",
        uni_weight=1.0,
    ),
    MethodSpec(
        "mmpareto",
        "MMPareto (ICML 2024): Pareto-combined fused/unimodal encoder gradients",
        unimodal_loss=True,
        update="pareto",
        uni_weight=1.0,
    ),
    MethodSpec(
        "masam",
        "MASAM (ICLR 2026): SAM on the top-scoring modality's encoder only",
        unimodal_loss=True,
        update="masam",
        uni_weight=1.0,
    ),
    MethodSpec(
        "mla",
        "MLA (CVPR 2024): alternating unimodal steps through one shared head",
        unimodal_loss=True,
        fusion="ensemble",
        shared_head=True,
        update="alternate",
        uni_weight=1.0,
    ),
    MethodSpec(
        "agm",
        "AGM (ICCV 2023): Shapley modality responses, gradients scaled per modality",
        update="agm",
    ),
    MethodSpec(
        "concat_dp", "late fusion under patient-level DP-SGD (the DP baseline)", private=True
    ),
    MethodSpec(
        "remdr_dp",
        "Re-M3Dr under patient-level DP-SGD: prototype-margin loss, DP-SAT, noisy modulation",
        unimodal_loss=True,
        prototypes=True,
        update="dpsat",
        private=True,
    ),
):
    register_method(_spec)
