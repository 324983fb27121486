"""The hyperparameters of every registered method (`MethodConfig`), one section of the config.

Kept apart from `remdr.config` so each stays a module one can read top to bottom; `remdr.config`
imports it into `ExperimentConfig` and re-exports it. Every field is a `setting` with its rule
(`remdr.settings`), so it is a `--set` flag and a run-config key at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from remdr.settings import FRACTION, NON_NEGATIVE, POSITIVE, setting

FUSED_LOSSES = ("mse", "bmc")
ENSEMBLE_INVERSE_MSE = -1.0  # `ensemble-oct-weight`: weights from each head's training error
LDS_AUTO = -1.0  # `lds-reweight`: the federated default below at a site, else plain MSE
# docs/federation.md, "Skewed mixes": 19 of 24 suite case-seeds better on validation
SITE_LDS_REWEIGHT = 0.25


@dataclass
class MethodConfig:
    """Hyperparameters of every registered method; each method reads the ones it needs."""

    lambda_uni: float = setting(
        0.5, "weight of the unimodal head losses (remdr family)", **NON_NEGATIVE
    )
    lambda_con: float = setting(0.1, "weight of the adaptive-margin SupCon loss", **NON_NEGATIVE)
    con_delta: float = setting(
        1.0, "dB; |y_i - y_j| <= delta makes a positive pair", **NON_NEGATIVE
    )
    con_tau: float = setting(0.1, "SupCon temperature", **POSITIVE)
    con_mu: float = setting(0.5, "margin strength; 0 gives plain SupCon", **NON_NEGATIVE)
    con_gamma: float = setting(
        0.5, "rarity exponent of the anchor weight p(y)^-gamma", **NON_NEGATIVE
    )
    con_span: float = setting(10.0, "dB; label distance at which the margin saturates", **POSITIVE)
    con_weight_clip: float = setting(5.0, "anchor weights (mean 1) are clipped to this", low=1)
    con_memory: int = setting(
        0,
        "SupCon also contrasts each anchor with the embeddings of this many recent training "
        "eyes (a cross-batch memory, kept where the training runs): positives for small "
        "batches; 0 = the batch only",
        **NON_NEGATIVE,
    )
    lds_sigma: float = setting(2.0, "dB; kernel of the label-density smoothing (LDS)", **POSITIVE)
    lds_reweight: float = setting(
        0.0,
        "weight each eye's squared errors by p(y)^-power from the LDS-smoothed training label "
        "density (rare, severe eyes count more); 0 = plain MSE, 0.5 = inverse square root; "
        f"{LDS_AUTO:g} = auto: {SITE_LDS_REWEIGHT:g} at a federation's sites (each site's own "
        "density; the federated default), 0 in pooled training, for private methods and under "
        "site-level DP",
        low=0,
        high=2,
        special=(LDS_AUTO,),
    )
    lds_weight_clip: float = setting(
        10.0, "LDS loss weights (training-set mean 1) are clipped to this", low=1
    )
    sam_rho: float = setting(0.05, "SAM neighbourhood radius", **NON_NEGATIVE)
    # 4: remdr's validation MSE 2.10 vs 2.12 with exact SAGM, at 0.68x the training time
    sam_every: int = setting(
        4,
        "SAM/SAGM ascent every k-th step (the others take the plain, still modulated, "
        "gradient): k = 1 is exact SAM at 2 passes a step, k = 4 costs 1.25 passes",
        low=1,
    )
    mod_alpha: float = setting(
        0.5, "modulation strength: k = 1 - tanh(alpha (r - 1))", **NON_NEGATIVE
    )
    mod_ema: float = setting(0.9, "EMA decay of the unimodal MSE scores", **FRACTION)
    mod_start_epoch: int = setting(0, "modulation runs for start <= epoch < end", **NON_NEGATIVE)
    mod_end_epoch: int = setting(-1, "end of the modulation; -1: until the last epoch", low=-1)
    ogm_noise: bool = setting(False, "add OGM-GE Gaussian noise to the modulated gradients")
    proto_bin_width: float = setting(2.0, "dB; MD bins of the learnable prototypes", **POSITIVE)
    # -- the multimodal baselines (docs/method.md, "Baselines") ------------------------------
    pareto_gamma: float = setting(
        1.5,
        "MMPareto: the encoders' combined gradient is scaled by gamma (a step size: AdamW, the "
        "default optimizer, divides a constant scale out, so it acts with optimizer=sgd)",
        **POSITIVE,
    )
    masam_weight: float = setting(
        0.8,
        "MASAM: score = w * loss decay + (1 - w) * gradient agreement; the top-scoring "
        "modality's encoder is the one perturbed",
        low=0,
        high=1,
    )
    agm_alpha: float = setting(
        1.0, "AGM: modulation strength, k_m = exp(alpha (target ratio - ratio))", **NON_NEGATIVE
    )
    ensemble_oct_weight: float = setting(
        ENSEMBLE_INVERSE_MSE,
        "ume, mla: the OCT head's weight in the prediction (the fundus head has 1 - w); -1 = "
        "inverse of each head's training MSE (EMA)",
        low=0,
        high=1,
        special=(ENSEMBLE_INVERSE_MSE,),
    )
    # -- the severe eyes: imbalanced-regression options, all off by default --------------------
    fused_loss: str = setting(
        "mse",
        "loss of the fused prediction: mse, or bmc (Balanced MSE, batch Monte-Carlo: Ren et al. "
        "CVPR 2022)",
        choices=FUSED_LOSSES,
    )
    bmc_sigma: float = setting(
        1.0, "dB; BMC's noise scale (fixed at the label noise, not learned)", **POSITIVE
    )
    conr_weight: float = setting(
        0.0, "weight of ConR (Keramati et al. ICLR 2024) on the fused embedding", **NON_NEGATIVE
    )
    conr_omega: float = setting(
        1.0, "dB; ConR: labels (and predictions of negatives) this close are similar", **POSITIVE
    )
    conr_tau: float = setting(0.2, "ConR temperature", **POSITIVE)
    ranksim_weight: float = setting(
        0.0,
        "weight of RankSim (Gong et al. ICML 2022) on the fused embedding",
        **NON_NEGATIVE,
    )
    ranksim_lambda: float = setting(
        2.0, "RankSim: interpolation strength of the blackbox rank gradient", **POSITIVE
    )
    head_gate: bool = setting(
        False,
        "the fused prediction is a learned per-eye gate over the fusion head and the two "
        "unimodal heads (softmax from [z_o; z_f])",
    )
    head_blend: bool = setting(
        False,
        "once training ends, blend a complete eye's fused prediction with one unimodal head, "
        "head and weight chosen on the validation eyes (0: the fusion head alone; the federated "
        "default)",
    )
    head_refit: bool = setting(
        False,
        "once training ends, refit each head's output layer by ridge regression on its hidden "
        "activations of the training eyes, strength chosen on the validation eyes (the trained "
        "layer where none is better; the federated default, from the sites' summed Grams)",
    )
