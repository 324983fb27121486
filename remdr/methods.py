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
| multitask       | both       | MSE(fused) + l_u MSE(uni)                   | plain           |
| ume             | both       | MSE(oct head) + MSE(fundus head); predicts  | plain           |
|                 |            | their weighted mean                         |                 |
| mmpareto        | both       | MSE(fused) + MSE(uni)                       | Pareto          |
| masam           | both       | MSE(fused) + MSE(uni)                       | MASAM           |
| mla             | both       | MSE(head) per modality, one shared head     | alternate       |
| agm             | both       | MSE(Shapley-modulated fused) (+ probes)     | plain           |
| concat_dp       | both       | MSE(fused) (+ probe heads)                  | DP-SGD          |
| remdr_dp        | both       | MSE(fused) + l_u MSE(uni) + l_c Proto-AM    | DP-SAT + noisy  |
|                 |            |                                             | modulation      |

"Probe heads" are the unimodal heads trained on detached features: they measure each
modality's strength (the OGM-GE scores) without changing what the encoders learn.
OGM-GE is adapted to regression: its scores are the probes' EMA MSE instead of class softmax.
The update rules themselves are in `remdr.update_rules`; the sources and regression
adaptations of the baselines are in their docstrings there and in docs/method.md.

Every fused method takes the severe-eye options of `MethodConfig` (all off by default): a
balanced fused loss (`fused-loss=bmc`), ConR or RankSim on the fused embedding, a gate over the
fused and unimodal heads (`head-gate`), LDS re-weighting (`lds-reweight`).

Private methods (`*_dp`) train only under DP-SGD (`remdr.privacy`), one row per patient, and
touch nothing that couples rows: in-batch SupCon becomes a per-example margin loss against
learnable MD-bin prototypes (`prototype_margin_loss`), SAM becomes DP-SAT (ascend along the
previous step's *noised* gradient, Park et al. ICML 2023), and the modulation coefficients come
from the previous noised gradients' per-branch energy (noise variance subtracted) instead of the
batch's unimodal losses; scaling a noised gradient is post-processing, so it costs no privacy.
A private method computes no statistic of the private labels outside DP-SGD: it fits no LDS
label density (none of them uses one) and its state holds only what it read from noised
gradients, so nothing it saves or sends is outside the guarantee. Its random draws come from OS
entropy (`remdr.privacy`), never from the run seed.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from remdr.config import ExperimentConfig, MethodConfig
from remdr.errors import ConfigError
from remdr.losses import (
    EmbeddingMemory,
    LabelDensity,
    adaptive_margin_supcon,
    anchor_weights,
    lds_loss_weights,
    lds_norm,
    prototype_bins,
    prototype_margin_loss,
)
from remdr.method_config import LDS_AUTO
from remdr.model import ReM3Dr, full_precision
from remdr.optim import DriftControl, HeadProjector, LossDecay, ModalityScores, ShapleyScores
from remdr.registry import MODALITIES, MethodSpec, get_spec
from remdr.regression_losses import bmc_loss, conr_loss, ranksim_loss
from remdr.update_rules import Terms, run_step, shapley_prediction, total, unwrapped
from remdr.weight_standardisation import standardise_convs


def create_method(name: str, cfg: MethodConfig | None = None) -> Method:
    return Method(get_spec(name), cfg or MethodConfig())


def build_model(cfg: ExperimentConfig, method: Method | None = None) -> ReM3Dr:
    """The network `cfg` trains: its method's branches, DP-ready for private methods or group-norm."""
    method = method or create_method(cfg.train.method, cfg.method)
    return method.build_model(cfg.model, cfg.data, group_norm=cfg.privacy.group_norm)


Batch = dict[str, torch.Tensor]


def presence(batch: Batch) -> dict[str, torch.Tensor] | None:
    """Which rows of a batch have which image (None: every row has both, e.g. old callers)."""
    masks = {m: batch[f"has_{m}"] for m in MODALITIES if f"has_{m}" in batch}
    return masks or None


def _squared_error(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (full_precision(pred) - y) ** 2


def lds_power(cfg: MethodConfig) -> float:
    """The LDS power this training uses: `auto` (-1) is a federation's default, which the run
    config resolves for its sites; pooled training left at auto trains plain MSE."""
    return 0.0 if cfg.lds_reweight == LDS_AUTO else cfg.lds_reweight


def _check_options(spec: MethodSpec, cfg: MethodConfig) -> None:
    """Options a method cannot take, refused in one line each."""
    coupled = {
        "lds-reweight": lds_power(cfg) > 0,
        "fused-loss=bmc": cfg.fused_loss == "bmc",
        "conr-weight": cfg.conr_weight > 0,
        "ranksim-weight": cfg.ranksim_weight > 0,
    }
    for key, on in coupled.items():
        if spec.private and on:
            raise ConfigError(
                f"{key} with the private method {spec.name}",
                "it reads a histogram of the private labels or couples the rows of a batch, "
                "outside DP-SGD's per-patient bound",
                f"leave {key.split('=')[0]} at its default",
            )
    if cfg.head_gate and spec.update == "agm":
        raise ConfigError(
            "head-gate with agm", "AGM's Shapley responses are of the fusion head alone",
            "head-gate=false",
        )  # fmt: skip


class Method:
    """Holds a method's state (label density, modality scores) and runs one training step."""

    def __init__(self, spec: MethodSpec, cfg: MethodConfig) -> None:
        _check_options(spec, cfg)
        self.spec, self.cfg = spec, cfg
        self._step_count = 0  # SAM every k-th step
        self.lds_norm = 1.0  # mean LDS loss weight of the training labels before scaling
        self.density = LabelDensity.uniform()
        self.target_var = 64.0  # dB^2: variance of the training labels (AGM's score scale)
        self.scores = ModalityScores(spec.modalities, cfg.mod_ema)
        self.last_k: dict[str, float] = {m: 1.0 for m in spec.modalities}
        self._noise_gen = torch.Generator().manual_seed(0)
        self.centres = prototype_bins(cfg.proto_bin_width)
        self._last_noisy: list[torch.Tensor] | None = None  # DP-SAT's ascent direction
        # SupCon's cross-batch memory, per modality: features of this training's recent eyes
        remember = spec.contrastive and cfg.con_memory > 0 and not spec.private
        self.memory = (
            {m: EmbeddingMemory(cfg.con_memory) for m in spec.modalities} if remember else {}
        )
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.decay = LossDecay(spec.modalities, cfg.mod_ema) if spec.update == "masam" else None
        self.shapley = ShapleyScores(spec.modalities) if spec.update == "agm" else None
        self.projector: HeadProjector | None = None  # MLA's, sized when the model is built
        # a federation's unimodal stage: each branch learns from its own head, no fused loss
        self.fused_off = False

    @property
    def name(self) -> str:
        return self.spec.name

    def setup(self, train_targets: np.ndarray, seed: int = 0) -> None:
        """Fit what depends on the training labels (the LDS density), once per training set.

        A private method fits nothing from the labels (a histogram of private labels would
        leave the guarantee) and seeds its noise from OS entropy instead of `seed`."""
        if self.spec.private:
            from remdr.privacy import entropy_seed

            self._noise_gen.manual_seed(entropy_seed())
            return
        if len(train_targets):
            targets = np.asarray(train_targets, dtype=np.float64)
            self.density = LabelDensity.fit(targets, self.cfg.lds_sigma)
            self.lds_norm = lds_norm(self.density, train_targets, lds_power(self.cfg))
            self.target_var = float(max(targets.var(), 1e-6))
        self._noise_gen.manual_seed(seed)

    def build_model(self, model_cfg, data_cfg, *, group_norm: bool = False) -> ReM3Dr:
        """The method's network; private methods (and `group_norm`) get a DP-ready one."""
        uses_prototypes = self.spec.prototypes and self.cfg.lambda_con > 0
        n_proto = len(self.centres) if uses_prototypes else 0  # unused layers break DP-SGD
        model = ReM3Dr(
            model_cfg, data_cfg, self.spec.modalities, n_prototypes=n_proto,
            fusion=self.spec.fusion, shared_head=self.spec.shared_head, gate=self.cfg.head_gate,
            blend=self.cfg.head_blend,
        )  # fmt: skip
        model.always_run_branches = self.spec.private
        if self.spec.update == "alternate":
            self.projector = HeadProjector(model_cfg.embed_dim)
        if self.spec.private:  # its random draws come from OS entropy, not the seeded torch RNG
            model.modality_dropout = 0.0
        for name, branch in model.branches.items():  # refused for private methods (config)
            if model_cfg.weight_standardise in (name, "both"):
                standardise_convs(branch)
        if self.spec.private or group_norm:
            from remdr.privacy import make_dp_ready

            model = make_dp_ready(model)
        return model

    # -- objective ---------------------------------------------------------------------------
    def loss(self, model: ReM3Dr, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's objective on a batch that may hold incomplete eyes: a term of an absent
        modality is left out for that row (never computed on the zeros standing in for it)."""
        terms, parts, _ = self.terms(model, batch)
        return total(terms), parts

    def terms(
        self, model: ReM3Dr, batch: Batch
    ) -> tuple[Terms, dict[str, float], dict[str, torch.Tensor]]:
        """The objective split into "fused" (the fused prediction and what acts on the fused
        embedding), "uni" (the unimodal heads' losses) and "aux" (per-modality contrastive
        terms), with the loss parts to report and the model's outputs. MMPareto and MASAM
        take the gradients of "uni" and of the rest apart."""
        spec, cfg = self.spec, self.cfg
        fused_inputs = len(spec.modalities) > 1
        out = model(
            batch.get("oct"),
            batch.get("fundus"),
            present=presence(batch),
            detach_heads=fused_inputs and not spec.unimodal_loss,
        )
        net = unwrapped(model)
        y = net.normalise(batch["md"])
        power = lds_power(cfg)
        weights = (
            lds_loss_weights(self.density, batch["md"], power, cfg.lds_weight_clip, self.lds_norm)
            if power > 0
            else None
        )

        def squared_error(pred: torch.Tensor) -> torch.Tensor:
            err = _squared_error(pred, y)
            return err if weights is None else err * weights

        # a unimodal method learns from the eyes that have its image; fusion from every eye
        rows = None if fused_inputs else out[f"present_{spec.modalities[0]}"]
        mse = self._mean(squared_error(out["pred"]), rows)
        terms: Terms = {"fused": [out["pred"].sum() * 0.0], "uni": [], "aux": []}
        parts: dict[str, float] = {"mse": float(mse.detach())}
        if not fused_inputs:
            terms["fused"] = [mse]
        elif spec.fusion == "mlp" and not self.fused_off:  # an ensemble has only its heads'
            terms["fused"] = [self._fused_loss(net, out, batch, y, mse, squared_error)]
        if fused_inputs:
            uni_weight = spec.uni_weight
            if uni_weight is None:  # probes: the weight is irrelevant to the encoders
                uni_weight = cfg.lambda_uni if spec.unimodal_loss else 1.0
            for m in spec.modalities:
                has_m = out[f"present_{m}"]
                if not has_m.any():
                    continue
                mse_m = self._mean(squared_error(out[f"pred_{m}"]), has_m)
                terms["uni"].append(uni_weight * mse_m)
                parts[f"mse_{m}"] = float(mse_m.detach())
            terms["aux"] = self._contrastive(out, batch, parts)
        parts["loss"] = float(total(terms).detach())
        return terms, parts, out

    def _fused_loss(self, net, out, batch, y, mse, squared_error) -> torch.Tensor:
        """The fused prediction's loss (`mse`, its (LDS-weighted) MSE, or BMC), plus ConR and
        RankSim on the fused embedding [z_o; z_f]; AGM modulates the prediction first."""
        cfg = self.cfg
        pred, loss = out["pred"], mse
        if self.shapley is not None:
            pred = shapley_prediction(self, net, out, y)
            loss = self._mean(squared_error(pred), None)
        if cfg.fused_loss == "bmc":
            loss = bmc_loss(full_precision(pred), y, cfg.bmc_sigma / net.md_scale)
        if cfg.conr_weight > 0 and len(y) > 1:
            weights = anchor_weights(self.density, batch["md"], 0.5, cfg.con_weight_clip)
            preds_db = net.to_db(full_precision(out["pred"]).detach())
            loss = loss + cfg.conr_weight * conr_loss(
                out["z"], batch["md"], preds_db, omega=cfg.conr_omega, tau=cfg.conr_tau,
                anchor_weights=weights,
            )  # fmt: skip
        if cfg.ranksim_weight > 0 and len(y) > 1:
            loss = loss + cfg.ranksim_weight * ranksim_loss(
                out["z"], batch["md"], cfg.ranksim_lambda
            )
        return loss

    def _contrastive(self, out: dict, batch: Batch, parts: dict[str, float]) -> list[torch.Tensor]:
        """The per-modality contrastive terms (remdr's SupCon, remdr_dp's prototypes)."""
        spec, cfg = self.spec, self.cfg
        terms: list[torch.Tensor] = []
        if cfg.lambda_con <= 0:
            return terms
        for m in spec.modalities if spec.contrastive else ():
            has_m = out[f"present_{m}"]
            if int(has_m.sum()) < 2:
                continue
            z_m, y_m = out[f"z_{m}"][has_m], batch["md"][has_m]
            memory = self.memory.get(m)
            con = adaptive_margin_supcon(
                z_m, y_m, memory=memory.get() if memory is not None else None,
                density=self.density, delta=cfg.con_delta, tau=cfg.con_tau, mu=cfg.con_mu,
                gamma=cfg.con_gamma, span=cfg.con_span, weight_clip=cfg.con_weight_clip,
            )  # fmt: skip
            terms.append(cfg.lambda_con * con)
            parts[f"con_{m}"] = float(con.detach())
            if memory is not None:
                self._pending[m] = (z_m, y_m)
        for m in spec.modalities if spec.prototypes else ():
            con = prototype_margin_loss(
                out[f"proto_{m}"], batch["md"], self.centres, tau=cfg.con_tau, mu=cfg.con_mu,
                span=cfg.con_span, mask=out[f"present_{m}"],
            )  # fmt: skip
            terms.append(cfg.lambda_con * con)
            parts[f"con_{m}"] = float(con.detach())
        return terms

    def _mean(self, per_row: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Mean of a per-row loss over the rows in `mask`. A private method divides by the
        whole batch instead (absent rows count as zero): a count of other rows in the
        denominator would let one patient rescale every other patient's gradient, which
        per-example clipping does not bound."""
        if mask is None:
            return per_row.mean()
        kept = per_row * mask.to(per_row.dtype)
        if self.spec.private:
            return kept.mean()
        return kept.sum() / mask.sum().clamp_min(1)

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
        control: DriftControl | None = None,
    ) -> dict[str, float]:
        """One optimisation step on `batch` by the method's update rule; returns the first
        pass's loss parts.

        `regulariser(model)` is added to the loss in every pass (FedProx's proximal term);
        `control` (SCAFFOLD) sees the first pass's raw gradients and corrects the final ones.
        """
        return run_step(self, model, optimizer, batch, epoch, autocast, regulariser, control)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What is saved with a run and kept between rounds. A private method's holds no label
        density; its scores (DP-SAT) are read from noised gradients only."""
        state: dict = {"name": self.name}
        if not self.spec.private:
            state["density"] = self.density.values.tolist()
            state["lds_norm"] = self.lds_norm
            state["target_var"] = self.target_var
        state["scores"] = self.scores.state_dict()
        for key, part in (("loss_decay", self.decay), ("shapley", self.shapley)):
            if part is not None:
                state[key] = part.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"state is for method {state.get('name')!r}, not {self.name!r}")
        if "density" in state and not self.spec.private:
            values = np.asarray(state["density"], dtype=np.float64)
            if values.shape != self.density.values.shape:
                raise ValueError("label density has the wrong number of bins")
            self.density = LabelDensity(values=values)
            self.lds_norm = float(state.get("lds_norm", 1.0))
            self.target_var = float(state.get("target_var", self.target_var))
        self.scores.load_state_dict(state["scores"])
        for key, part in (("loss_decay", self.decay), ("shapley", self.shapley)):
            if part is not None and key in state:
                part.load_state_dict(state[key])
