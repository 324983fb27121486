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
| concat_dp       | both       | MSE(fused) (+ probe heads)                  | DP-SGD          |
| remdr_dp        | both       | MSE(fused) + l_u MSE(uni) + l_c Proto-AM    | DP-SAT + noisy  |
|                 |            |                                             | modulation      |

"Probe heads" are the unimodal heads trained on detached features: they measure each
modality's strength (the OGM-GE scores) without changing what the encoders learn.
OGM-GE is adapted to regression: its scores are the probes' EMA MSE instead of class softmax.

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
from remdr.errors import ConfigError, PrivacyError
from remdr.losses import (
    EmbeddingMemory,
    LabelDensity,
    adaptive_margin_supcon,
    lds_loss_weights,
    lds_norm,
    prototype_bins,
    prototype_margin_loss,
)
from remdr.model import ReM3Dr, full_precision
from remdr.optim import (
    DriftControl,
    ModalityScores,
    branch_signal,
    frozen_buffers,
    sam_perturbation,
    scale_gradients,
)
from remdr.registry import MODALITIES, MethodSpec, get_spec


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


def unwrapped(model: torch.nn.Module) -> ReM3Dr:
    """The ReM3Dr inside an Opacus grad-sample wrapper (or the model itself)."""
    return getattr(model, "_module", model)


class Method:
    """Holds a method's state (label density, modality scores) and runs one training step."""

    def __init__(self, spec: MethodSpec, cfg: MethodConfig) -> None:
        if spec.private and cfg.lds_reweight > 0:
            raise ConfigError(
                f"lds-reweight={cfg.lds_reweight:g} with the private method {spec.name}",
                "its weights would come from a histogram of the private labels, outside DP-SGD",
                "lds-reweight=0",
            )
        self.spec, self.cfg = spec, cfg
        self._step_count = 0  # SAM every k-th step
        self.lds_norm = 1.0  # mean LDS loss weight of the training labels before scaling
        self.density = LabelDensity.uniform()
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
            self.density = LabelDensity.fit(
                np.asarray(train_targets, dtype=np.float64), self.cfg.lds_sigma
            )
            self.lds_norm = lds_norm(self.density, train_targets, self.cfg.lds_reweight)
        self._noise_gen.manual_seed(seed)

    def build_model(self, model_cfg, data_cfg, *, group_norm: bool = False) -> ReM3Dr:
        """The method's network; private methods (and `group_norm`) get a DP-ready one."""
        uses_prototypes = self.spec.prototypes and self.cfg.lambda_con > 0
        n_proto = len(self.centres) if uses_prototypes else 0  # unused layers break DP-SGD
        model = ReM3Dr(model_cfg, data_cfg, self.spec.modalities, n_prototypes=n_proto)
        model.always_run_branches = self.spec.private
        if self.spec.private:  # its random draws come from OS entropy, not the seeded torch RNG
            model.modality_dropout = 0.0
        if self.spec.private or group_norm:
            from remdr.privacy import make_dp_ready

            model = make_dp_ready(model)
        return model

    # -- objective ---------------------------------------------------------------------------
    def loss(self, model: ReM3Dr, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's objective on a batch that may hold incomplete eyes: a term of an absent
        modality is left out for that row (never computed on the zeros standing in for it)."""
        spec, cfg = self.spec, self.cfg
        fused_inputs = len(spec.modalities) > 1
        out = model(
            batch.get("oct"),
            batch.get("fundus"),
            present=presence(batch),
            detach_heads=fused_inputs and not spec.unimodal_loss,
        )
        y = unwrapped(model).normalise(batch["md"])
        weights = (
            lds_loss_weights(
                self.density, batch["md"], cfg.lds_reweight, cfg.lds_weight_clip, self.lds_norm
            )
            if cfg.lds_reweight > 0
            else None
        )

        def squared_error(pred: torch.Tensor) -> torch.Tensor:
            err = _squared_error(pred, y)
            return err if weights is None else err * weights

        # a unimodal method learns from the eyes that have its image; fusion from every eye
        rows = None if fused_inputs else out[f"present_{spec.modalities[0]}"]
        total = self._mean(squared_error(out["pred"]), rows)
        parts = {"mse": float(total.detach())}
        if fused_inputs:
            uni_weight = (
                cfg.lambda_uni if spec.unimodal_loss else 1.0
            )  # probes: weight is irrelevant
            for m in spec.modalities:
                has_m = out[f"present_{m}"]
                if not has_m.any():
                    continue
                mse_m = self._mean(squared_error(out[f"pred_{m}"]), has_m)
                total = total + uni_weight * mse_m
                parts[f"mse_{m}"] = float(mse_m.detach())
            if spec.contrastive and cfg.lambda_con > 0:
                for m in spec.modalities:
                    has_m = out[f"present_{m}"]
                    if int(has_m.sum()) < 2:
                        continue
                    z_m, y_m = out[f"z_{m}"][has_m], batch["md"][has_m]
                    memory = self.memory.get(m)
                    con = adaptive_margin_supcon(
                        z_m,
                        y_m,
                        memory=memory.get() if memory is not None else None,
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
                    if memory is not None:
                        self._pending[m] = (z_m, y_m)
            if spec.prototypes and cfg.lambda_con > 0:
                for m in spec.modalities:
                    con = prototype_margin_loss(
                        out[f"proto_{m}"],
                        batch["md"],
                        self.centres,
                        tau=cfg.con_tau,
                        mu=cfg.con_mu,
                        span=cfg.con_span,
                        mask=out[f"present_{m}"],
                    )
                    total = total + cfg.lambda_con * con
                    parts[f"con_{m}"] = float(con.detach())
        parts["loss"] = float(total.detach())
        return total, parts

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
        """One optimisation step on `batch`; returns the first pass's loss parts.

        `regulariser(model)` is added to the loss in every pass (FedProx's proximal term);
        `control` (SCAFFOLD) sees the first pass's raw gradients and corrects the final ones.
        """
        update = self.spec.update
        if self.spec.private:
            if control is not None:
                raise PrivacyError(
                    f"drift control with the private method {self.name}",
                    "its control variates would be mean gradients outside the DP guarantee",
                    "drift-control=off",
                )
            return self._private_step(model, optimizer, batch, epoch, autocast, regulariser)

        def objective() -> tuple[torch.Tensor, dict[str, float]]:
            with autocast():
                loss, parts = self.loss(model, batch)
            if regulariser is not None:
                loss = loss + regulariser(model)
            return loss, parts

        optimizer.zero_grad(set_to_none=True)
        loss, parts = objective()
        loss.backward()
        for m, (z, y) in self._pending.items():  # this batch joins the memory after its loss
            self.memory[m].push(z, y)
        self._pending = {}
        if control is not None:
            control.observe()
        self.scores.update({m: parts.get(f"mse_{m}", float("nan")) for m in self.spec.modalities})
        self._step_count += 1
        ascent_step = (self._step_count - 1) % self.cfg.sam_every == 0
        if update in ("sam", "sagm") and self.cfg.sam_rho > 0 and ascent_step:
            params = [p for p in model.parameters() if p.requires_grad]
            with sam_perturbation(params, self.cfg.sam_rho), frozen_buffers(model):
                optimizer.zero_grad(set_to_none=True)
                objective()[0].backward()
            self._pending = {}  # the ascent pass's features are not remembered
        if update in ("modulate", "sagm") and self.modulation_active(epoch):
            self.last_k = self.scores.coefficients(self.cfg.mod_alpha)
            noise = self.spec.ogm_noise or self.cfg.ogm_noise
            for m, k in self.last_k.items():
                if k < 1.0:
                    scale_gradients(
                        model.encoder_parameters(m), k, noise=noise, gen=self._noise_gen
                    )
        if control is not None:
            control.correct()
        optimizer.step()
        for m, k in self.last_k.items():
            parts[f"k_{m}"] = k
        return parts

    def _private_step(self, model, optimizer, batch, epoch, autocast, regulariser):
        """DP-SGD step: per-patient clip + noise (Opacus), then only post-processing.

        DP-SAT: the forward/backward runs at theta + rho u/||u|| where u is the previous step's
        noised gradient (already released), so the ascent costs no privacy. Modulation scales
        the noised gradient by coefficients from earlier noised gradients. FedProx's proximal
        term depends on no data and is added after the noise; its gradient is taken before the
        noised step, so a failure there releases nothing.
        """
        if not hasattr(optimizer, "pre_step"):
            raise PrivacyError(
                f"method {self.name} trains only under DP-SGD",
                "its optimiser is not Opacus' DPOptimizer",
                "train it with fit(), which wraps the model and optimiser",
            )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer.zero_grad(set_to_none=True)
        rho = self.cfg.sam_rho if self.spec.update == "dpsat" else 0.0
        parts: dict[str, float] = {}
        if len(batch["md"]) == 0:  # an empty Poisson batch still releases noise: never skip it
            for p in params:
                p.grad_sample = p.new_zeros((0, *p.shape))
        else:
            with sam_perturbation(params, rho, direction=self._last_noisy):
                with autocast():
                    loss, parts = self.loss(model, batch)
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
        if self.spec.update == "dpsat":
            self._last_noisy = [p.grad.detach().clone() for p in params]
            noise_std = optimizer.noise_multiplier * optimizer.max_grad_norm
            noise_std /= max(1, optimizer.expected_batch_size)
            self.scores.update(
                {
                    m: 1.0 / branch_signal(unwrapped(model).encoder_parameters(m), noise_std)
                    for m in self.spec.modalities
                }
            )
            if self.modulation_active(epoch):
                self.last_k = self.scores.coefficients(self.cfg.mod_alpha)
                for m, k in self.last_k.items():
                    if k < 1.0:
                        scale_gradients(unwrapped(model).encoder_parameters(m), k)
        if prox is not None:
            for p, g in zip(params, prox, strict=True):
                if g is not None:
                    p.grad.add_(g)
        optimizer.original_optimizer.step()
        if parts:  # an empty batch released noise only: there is no loss to report
            parts.update({f"k_{m}": k for m, k in self.last_k.items()})
        return parts

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What is saved with a run and kept between rounds. A private method's holds no label
        density; its scores (DP-SAT) are read from noised gradients only."""
        state: dict = {"name": self.name}
        if not self.spec.private:
            state["density"] = self.density.values.tolist()
            state["lds_norm"] = self.lds_norm
        state["scores"] = self.scores.state_dict()
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
        self.scores.load_state_dict(state["scores"])
