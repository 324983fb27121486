"""Sample-level differential privacy at one site: the guarantee a privacy officer can sign.

Guarantee: (epsilon, delta)-DP for adding or removing **one patient** (all their eyes, both
modalities) at the site, over every set of weights the site releases, accumulated across rounds
and runs in an append-only ledger. Each part below does one job and knows nothing of the trainer;
`open_private` wires them together, as Opacus' `PrivacyEngine` does its validators, grad samplers,
optimizer and accountant:

* `surgery.make_dp_ready`: DP-SGD clips each row's gradient, so no layer may mix rows (BatchNorm,
  including timm's fused BN+act), no in-place op may break Opacus' hooks, and conv inputs must be
  contiguous (Opacus' unfold assumes NCHW; channels-last inputs give wrong per-sample gradients).
* `gradcheck.choose_grad_sample_mode`: per-sample gradients are checked against one-row-at-a-time
  autograd on the real model, never assumed; a model that fails in every mode is refused.
* `sampling.PatientRows`: one row per patient, so clipping a row bounds the patient's whole
  contribution to a step.
* `accounting`: pure functions of the release history: `epsilon_of` composes releases with RDP,
  `plan` fixes sigma, q and steps and declines training that would pass the ceiling.
* `ledger.PrivacyLedger`: Flower's Opacus example builds a new accountant every round, so its
  epsilon is per round; here the site's release history lives in a file (completed and aborted
  trainings alike) and the ceiling is checked against it *before* any training.
  A training holds the ledger (a file lock) from its ceiling check to its entry, so two trainings
  at one site cannot both spend the last of the budget.
* `randomness`: every draw of a private training (Poisson sampling, noise, the eye per patient,
  augmentation, dropout) is seeded from OS entropy per site and session, never from the run
  seed the coordinator chooses; the ledger entry records this (`"randomness": "os-entropy"`).
* `session.open_private` / `PrivateSession`: hold the ledger, check, plan, wrap with Opacus
  (Poisson sampling), and append the ledger entry when training ends, also when it fails
  part-way.
* `report.privacy_report`: the ledger as text for humans, with what the guarantee does not cover.

Importing this package is cheap: Opacus is imported only when one of these is called.
"""

from remdr.privacy.accounting import PrivacyPlan, epsilon_of, plan, release_of
from remdr.privacy.gradcheck import choose_grad_sample_mode, per_sample_gradient_error, probe_batch
from remdr.privacy.ledger import PrivacyLedger
from remdr.privacy.randomness import (
    RANDOMNESS,
    entropy_seed,
    private_generator,
    private_global_rng,
)
from remdr.privacy.report import privacy_report
from remdr.privacy.sampling import PatientRows
from remdr.privacy.session import PrivateSession, open_private
from remdr.privacy.surgery import make_dp_ready

__all__ = [
    "RANDOMNESS",
    "PatientRows",
    "PrivacyLedger",
    "PrivacyPlan",
    "PrivateSession",
    "choose_grad_sample_mode",
    "entropy_seed",
    "epsilon_of",
    "make_dp_ready",
    "open_private",
    "per_sample_gradient_error",
    "plan",
    "private_generator",
    "private_global_rng",
    "privacy_report",
    "probe_batch",
    "release_of",
]
