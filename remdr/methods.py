"""The method registry: every method is an objective plus an update rule run by one loop.

| name            | modalities | objective                                   | update          |
|-----------------|------------|---------------------------------------------|-----------------|
| oct, fundus     | one        | MSE of that branch                          | plain           |
| concat          | both       | MSE(fused) (+ probe heads)                  | plain           |
| ogm_ge          | both       | MSE(fused) (+ probe heads)                  | modulate + noise|
| sam             | both       | MSE(fused) (+ probe heads)                  | SAM             |
| remdr           | both       | MSE(fused) + l_u MSE(uni) + l_c SupCon-AM   | SAGM            |
| remdr_no_con    | both       | MSE(fused) + l_u MSE(uni)                   | SAGM            |
| remdr_no_sagm   | both       | MSE(fused) + l_u MSE(uni) + l_c SupCon-AM   | plain           |

"Probe heads" are the unimodal heads trained on detached features: they measure each
modality's strength (the OGM-GE scores) without changing what the encoders learn.
OGM-GE is adapted to regression: its scores are the probes' EMA MSE instead of class softmax.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from remdr.config import MethodConfig
from remdr.errors import ConfigError
from remdr.losses import LabelDensity, adaptive_margin_supcon
from remdr.model import MODALITIES, ReM3Dr
from remdr.optim import ModalityScores, frozen_buffers, sam_perturbation, scale_gradients

UPDATES = ("plain", "modulate", "sam", "sagm")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str
    modalities: tuple[str, ...] = MODALITIES
    unimodal_loss: bool = False  # unimodal heads train the encoders (else they are probes)
    contrastive: bool = False
    update: str = "plain"  # one of UPDATES
    ogm_noise: bool = False


_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.update not in UPDATES:
        raise ValueError(f"unknown update rule {spec.update!r}")
    _REGISTRY[spec.name] = spec
    return spec


def list_methods() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown method '{name}'", f"{hint}valid: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def create_method(name: str, cfg: MethodConfig | None = None) -> Method:
    return Method(get_spec(name), cfg or MethodConfig())


Batch = dict[str, torch.Tensor]


class Method:
    """Holds a method's state (label density, modality scores) and runs one training step."""

    def __init__(self, spec: MethodSpec, cfg: MethodConfig) -> None:
        self.spec, self.cfg = spec, cfg
        self.density = LabelDensity.uniform()
        self.scores = ModalityScores(spec.modalities, cfg.mod_ema)
        self.last_k: dict[str, float] = {m: 1.0 for m in spec.modalities}
        self._noise_gen = torch.Generator().manual_seed(0)

    @property
    def name(self) -> str:
        return self.spec.name

    def setup(self, train_targets: np.ndarray, seed: int = 0) -> None:
        """Fit what depends on the training labels (the LDS density), once per training set."""
        if len(train_targets):
            self.density = LabelDensity.fit(
                np.asarray(train_targets, dtype=np.float64), self.cfg.lds_sigma
            )
        self._noise_gen.manual_seed(seed)

    def build_model(self, model_cfg, data_cfg) -> ReM3Dr:
        return ReM3Dr(model_cfg, data_cfg, self.spec.modalities)

    # -- objective ---------------------------------------------------------------------------
    def loss(self, model: ReM3Dr, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        spec, cfg = self.spec, self.cfg
        fused_inputs = len(spec.modalities) > 1
        out = model(
            batch.get("oct"),
            batch.get("fundus"),
            detach_heads=fused_inputs and not spec.unimodal_loss,
        )
        y = model.normalise(batch["md"])
        total = F.mse_loss(out["pred"].float(), y)
        parts = {"mse": float(total.detach())}
        if fused_inputs:
            uni_weight = (
                cfg.lambda_uni if spec.unimodal_loss else 1.0
            )  # probes: weight is irrelevant
            for m in spec.modalities:
                mse_m = F.mse_loss(out[f"pred_{m}"].float(), y)
                total = total + uni_weight * mse_m
                parts[f"mse_{m}"] = float(mse_m.detach())
            if spec.contrastive and cfg.lambda_con > 0:
                for m in spec.modalities:
                    con = adaptive_margin_supcon(
                        out[f"z_{m}"],
                        batch["md"],
                        density=self.density,
                        delta=cfg.con_delta,
                        tau=cfg.con_tau,
                        mu=cfg.con_mu,
                        gamma=cfg.con_gamma,
                        span=cfg.con_span,
                        weight_clip=cfg.con_weight_clip,
                    )
                    total = total + cfg.lambda_con * con
                    parts[f"con_{m}"] = float(con.detach())
        parts["loss"] = float(total.detach())
        return total, parts

    # -- update rule -------------------------------------------------------------------------
    def modulation_active(self, epoch: int) -> bool:
        c = self.cfg
        return (
            len(self.spec.modalities) > 1
            and c.mod_start_epoch <= epoch
            and (c.mod_end_epoch < 0 or epoch < c.mod_end_epoch)
        )

    def step(
        self,
        model: ReM3Dr,
        optimizer: torch.optim.Optimizer,
        batch: Batch,
        epoch: int,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        regulariser: Callable[[ReM3Dr], torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One optimisation step on `batch`; returns the first pass's loss parts.

        `regulariser(model)` is added to the loss in every pass (FedProx's proximal term).
        """
        update = self.spec.update

        def objective() -> tuple[torch.Tensor, dict[str, float]]:
            with autocast():
                loss, parts = self.loss(model, batch)
            if regulariser is not None:
                loss = loss + regulariser(model)
            return loss, parts

        optimizer.zero_grad(set_to_none=True)
        loss, parts = objective()
        loss.backward()
        self.scores.update({m: parts.get(f"mse_{m}", float("nan")) for m in self.spec.modalities})
        if update in ("sam", "sagm") and self.cfg.sam_rho > 0:
            params = [p for p in model.parameters() if p.requires_grad]
            with sam_perturbation(params, self.cfg.sam_rho), frozen_buffers(model):
                optimizer.zero_grad(set_to_none=True)
                objective()[0].backward()
        if update in ("modulate", "sagm") and self.modulation_active(epoch):
            self.last_k = self.scores.coefficients(self.cfg.mod_alpha)
            noise = self.spec.ogm_noise or self.cfg.ogm_noise
            for m, k in self.last_k.items():
                if k < 1.0:
                    scale_gradients(
                        model.encoder_parameters(m), k, noise=noise, gen=self._noise_gen
                    )
        optimizer.step()
        for m, k in self.last_k.items():
            parts[f"k_{m}"] = k
        return parts

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "name": self.name,
            "density": self.density.values.tolist(),
            "scores": self.scores.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for method {state.get('name')!r}, not {self.name!r}")
        values = np.asarray(state["density"], dtype=np.float64)
        if values.shape != self.density.values.shape:
            raise ValueError("label density has the wrong number of bins")
        self.density = LabelDensity(values=values)
        self.scores.load_state_dict(state["scores"])


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
):
    register_method(_spec)
