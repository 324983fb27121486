"""What is claimed, and what it costs: the releases' RDP composition and the plan of a training.

Pure functions of the release history (noise multiplier, sample rate, steps); the history itself
lives in the ledger. `plan` fixes sigma, q and the step count *before* training and refuses any
training that would take the site's cumulative epsilon past its ceiling.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from remdr.config import PrivacyConfig
from remdr.errors import PrivacyError
from remdr.privacy.quiet_opacus import import_opacus

UNIT = "patient"
RELATION = "add or remove one patient (all their eyes, OCT and fundus, every augmented view)"
MECHANISM = "DP-SGD: Poisson-subsampled Gaussian mechanism, one clipped row per patient (Opacus)"
ACCOUNTANT = "rdp"

Release = tuple[float, float, int]  # (noise multiplier, sample rate, steps)
History = list[Release]


def release_of(entry: dict) -> Release:
    """The accountant's view of one ledger entry: (noise multiplier, sample rate, steps)."""
    return float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])


def epsilon_of(history: Iterable[Release], delta: float) -> float:
    """Cumulative epsilon of a sequence of Poisson-subsampled Gaussian steps (Opacus RDP)."""
    import_opacus()
    from opacus.accountants import RDPAccountant

    steps = [(s, q, n) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    acc = RDPAccountant()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta))


@dataclass
class PrivacyPlan:
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    patients: int
    epsilon_before: float
    epsilon_after: float  # projected, if every planned step runs


def plan(
    cfg: PrivacyConfig,
    spent: Iterable[Release] = (),
    *,
    patients: int,
    batch_size: int,
    epochs: int,
    planned_rounds: int = 1,
) -> PrivacyPlan:
    """Fix sigma, q and the step count, and refuse training that would break the ceiling.

    `spent` is the site's release history (its ledger). Opacus' Poisson loader takes
    ceil(patients / batch) steps per epoch at q = 1 / that; sigma for a target epsilon is solved
    over `planned_rounds` such trainings."""
    if patients < 2:
        raise PrivacyError(f"{patients} patient(s) at this site", "DP-SGD needs at least two")
    if cfg.dp_delta > 1.0 / patients:
        raise PrivacyError(
            f"dp-delta={cfg.dp_delta:g}",
            f"must be at most 1/{patients} (one over the number of patients)",
            f"set dp-delta to {0.1 / patients:.1g} or less",
        )
    steps_per_epoch = math.ceil(patients / batch_size)
    q, steps = 1.0 / steps_per_epoch, steps_per_epoch * epochs
    if cfg.dp_target_epsilon > 0:
        import_opacus()
        from opacus.accountants.utils import get_noise_multiplier

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "optimal order is the largest alpha" at small eps
            sigma = get_noise_multiplier(
                target_epsilon=cfg.dp_target_epsilon,
                target_delta=cfg.dp_delta,
                sample_rate=q,
                steps=steps * planned_rounds,
                accountant=ACCOUNTANT,
            )
    else:
        sigma = cfg.dp_noise
    if sigma <= 0:
        raise PrivacyError("dp-noise=0", "training without noise has no privacy guarantee")
    spent = list(spent)
    before = epsilon_of(spent, cfg.dp_delta)
    after = epsilon_of(spent + [(sigma, q, steps)], cfg.dp_delta)
    if after > cfg.dp_epsilon_max:
        raise PrivacyError(
            "privacy budget: training declined",
            f"it would raise epsilon from {before:.2f} to {after:.2f}, above the ceiling "
            f"{cfg.dp_epsilon_max:g} (delta {cfg.dp_delta:g})",
            "the site's patients have spent their budget; only the privacy officer may raise "
            "dp-epsilon-max",
        )
    return PrivacyPlan(sigma, cfg.dp_clip, q, steps, cfg.dp_delta, patients, before, after)
