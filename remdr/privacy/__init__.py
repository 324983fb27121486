"""Sample-level differential privacy at one site: the guarantee a privacy officer can sign.

Guarantee: (epsilon, delta)-DP for adding or removing **one patient** (all their eyes, both
modalities) at the site, over every set of weights the site releases, accumulated across rounds
and runs in an append-only ledger. Why each piece is here:

* `make_dp_ready`: DP-SGD clips each row's gradient, so no layer may mix rows (BatchNorm,
  including timm's fused BN+act), no in-place op may break Opacus' hooks, and conv inputs must be
  contiguous (Opacus' unfold assumes NCHW; channels-last inputs give wrong per-sample gradients).
* `choose_grad_sample_mode`: per-sample gradients are checked against one-at-a-time autograd on
  the real model, never assumed; a model that fails in every mode is refused.
* `PatientRows`: one row per patient, so clipping a row bounds the patient's whole contribution.
* `PrivacyLedger`: Flower's Opacus example builds a new accountant every round, so its epsilon is
  per round; here the site's RDP history lives in a file and a hard ceiling is checked *before*
  any training that would exceed it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from remdr.config import PrivacyConfig
from remdr.errors import PrivacyError

UNIT = "patient"
RELATION = "add or remove one patient (all their eyes, OCT and fundus, every augmented view)"
MECHANISM = "DP-SGD: Poisson-subsampled Gaussian mechanism, one clipped row per patient (Opacus)"
ACCOUNTANT = "rdp"
NOT_COVERED = (
    "metrics a site reports each round (training loss, validation MSE/MAE per severity bin)",
    "dataset sizes (number of training and validation eyes) sent with each update",
    "normalisation: remdr uses fixed constants (no statistic of private images is computed); "
    "any statistic you fit on private images yourself is not covered",
    "choices made on private data outside the ledger (tuning runs, model selection on a "
    "validation split); DP training keeps the last weights for this reason",
    "the other sites' data and the server's aggregate: each site's ledger covers its own patients",
)
CHECK_TOLERANCE = 1e-5  # relative error allowed (float64) between Opacus' and one-at-a-time
MODES = ("hooks", "ew")


# -- a model DP-SGD can clip ------------------------------------------------------------------


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def _group_norm(num_channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, num_channels), num_channels, eps=eps, affine=True)


def _replace_fused_batchnorm(module: nn.Module) -> None:
    """timm's BatchNormAct2d is a BatchNorm subclass Opacus' validator does not catch."""
    for name, child in module.named_children():
        if type(child).__name__ in ("BatchNormAct2d", "SyncBatchNormAct"):
            act, drop = getattr(child, "act", nn.Identity()), getattr(child, "drop", nn.Identity())
            setattr(
                module, name, nn.Sequential(_group_norm(child.num_features, child.eps), drop, act)
            )
        else:
            _replace_fused_batchnorm(child)


def make_dp_ready(model: nn.Module) -> nn.Module:
    """Norm layers -> GroupNorm, no in-place ops, contiguous conv inputs. Returns a new model."""
    from opacus.validators import ModuleValidator

    _replace_fused_batchnorm(model)
    logging.getLogger("opacus").setLevel(logging.WARNING)  # it logs every layer it replaces
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ModuleValidator.fix(model)
    for module in model.modules():
        if hasattr(module, "one_view_per_call"):
            module.one_view_per_call = True
        if getattr(module, "inplace", False) is True:
            module.inplace = False
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(_contiguous_input)
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        raise PrivacyError(
            "the model cannot be trained with DP-SGD",
            "; ".join(str(p) for p in problems[:3]),
            "choose a backbone without batch-coupled layers",
        )
    return model


# -- per-sample gradients, checked ------------------------------------------------------------

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    from opacus.grad_sample.utils import wrap_model

    return wrap_model(model, mode, batch_first=True, loss_reduction="mean")


def _unwrap(wrapped: nn.Module, model: nn.Module) -> None:
    if hasattr(wrapped, "_close"):
        wrapped._close()
    for p in model.parameters():
        p.grad_sample = None
        p.grad = None


def per_sample_gradient_error(
    model: nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor], mode: str
) -> float:
    """Largest relative error between Opacus' per-sample gradients (`mode`) and the gradients
    of each row computed alone, on a float64 copy of the model: in float32 a ReLU whose input
    is ~0 can flip between the batched and the single-row pass, an error that is not a bug.
    Dropout is off so both passes see the same function."""
    model = copy.deepcopy(model).double()
    batch = {k: v.double() for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    n = int(batch["md"].shape[0])
    reference = []
    for i in range(n):
        model.zero_grad(set_to_none=True)
        loss_fn(model, {k: v[i : i + 1] for k, v in batch.items()}).backward()
        reference.append(
            [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        )
    model.zero_grad(set_to_none=True)
    wrapped = _wrap(model, mode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on hooks when inputs need no grad
            loss_fn(wrapped, batch).backward()
        wants = [torch.stack([r[j] for r in reference]) for j in range(len(params))]
        # A parameter whose true gradient is ~0 (e.g. a bias before a softmax) is judged
        # against the whole gradient's size, not its own rounding noise.
        floor = 1e-6 * float(torch.stack([w.norm() for w in wants]).norm()) + 1e-12
        worst = 0.0
        for p, want in zip(params, wants, strict=True):
            got = getattr(p, "grad_sample", None)
            if got is None:
                if want.abs().max() == 0:
                    continue
                return math.inf
            err = float((got.float() - want).norm()) / max(float(want.norm()), floor)
            worst = max(worst, err)
        return worst
    finally:
        _unwrap(wrapped, model)


def choose_grad_sample_mode(
    model: nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor], requested: str = "auto"
) -> str:
    """The first grad-sample mode whose per-sample gradients pass the check on this model."""
    failures = []
    for mode in MODES if requested == "auto" else (requested,):
        try:
            err = per_sample_gradient_error(model, loss_fn, batch, mode)
        except Exception as exc:  # noqa: BLE001 - any failure of a mode means "not this mode"
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
            failures.append(f"{mode}: {type(exc).__name__} {first}".strip())
            continue
        if err <= CHECK_TOLERANCE:
            return mode
        failures.append(f"{mode}: per-sample gradients off by {err:.2g} (relative)")
    raise PrivacyError(
        "no grad-sample mode gives correct per-sample gradients for this model",
        "; ".join(failures),
        "choose another backbone; with oct-view=bscans the shared encoder sees K rows per "
        "patient, so use oct-view=rnflt",
    )


def probe_batch(example: dict[str, torch.Tensor], n: int = 4, seed: int = 0) -> dict:
    """Random inputs shaped like one training item: the check never touches private data."""
    gen = torch.Generator().manual_seed(seed)
    out = {
        k: torch.randn((n, *v.shape), generator=gen)
        for k, v in example.items()
        if k in ("oct", "fundus")
    }
    out["md"] = torch.rand(n, generator=gen) * 35 - 30
    return out


# -- one row per patient ----------------------------------------------------------------------


class PatientRows(Dataset):
    """One row per patient: each access returns one of the patient's eyes, drawn at random.

    The row depends on that patient's data alone (plus randomness independent of the data), so
    clipping it bounds everything the patient contributes to a step.
    """

    def __init__(self, eyes: Dataset, patient_ids: Iterable[str], seed: int = 0) -> None:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, pid in enumerate(patient_ids):
            groups[pid].append(i)
        self.eyes, self.groups = eyes, list(groups.values())
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, p: int):
        eyes = self.groups[p]
        return self.eyes[eyes[int(self.rng.integers(len(eyes)))]]


# -- accounting -------------------------------------------------------------------------------

History = list[tuple[float, float, int]]  # (noise multiplier, sample rate, steps)


def release_of(entry: dict) -> tuple[float, float, int]:
    """The accountant's view of one ledger entry: (noise multiplier, sample rate, steps)."""
    return float(entry["noise_multiplier"]), float(entry["sample_rate"]), int(entry["steps"])


def epsilon_of(history: History, delta: float) -> float:
    """Cumulative epsilon of a sequence of Poisson-subsampled Gaussian steps (Opacus RDP)."""
    from opacus.accountants import RDPAccountant

    steps = [(s, q, n) for s, q, n in history if n > 0]
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    acc = RDPAccountant()
    acc.history = list(steps)
    return float(acc.get_epsilon(delta))


class PrivacyLedger:
    """Append-only JSON-lines file of every private release made from one site's data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()

    def entries(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                release_of(entry)
            except (ValueError, KeyError, TypeError):
                raise PrivacyError(
                    f"privacy ledger {self.path} line {n} is corrupt",
                    "the spent budget cannot be known",
                    "restore the ledger from backup; never delete it to reset the budget",
                ) from None
            out.append(entry)
        return out

    def history(self) -> History:
        return [release_of(e) for e in self.entries()]

    def epsilon(self, delta: float, extra: History = ()) -> float:
        return epsilon_of(self.history() + list(extra), delta)

    def append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


# -- one private training session -------------------------------------------------------------


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
    ledger: PrivacyLedger | None,
    *,
    patients: int,
    batch_size: int,
    epochs: int,
    planned_rounds: int = 1,
) -> PrivacyPlan:
    """Fix sigma, q and the step count, and refuse training that would break the ceiling.

    Opacus' Poisson loader takes ceil(patients / batch) steps per epoch at q = 1 / that; sigma
    for a target epsilon is solved over `planned_rounds` such trainings."""
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
    spent = ledger.history() if ledger else []
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


class PrivateSession:
    """Opacus around one `fit`: Poisson loader over patients, clipped and noised steps, and a
    ledger entry when it ends (also when it fails: steps taken were released to the optimiser)."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        rows: PatientRows,
        the_plan: PrivacyPlan,
        mode: str,
        ledger: PrivacyLedger | None,
        *,
        batch_size: int,
        seed: int,
        label: dict,
    ) -> None:
        from opacus import PrivacyEngine

        self.plan, self.mode, self.ledger, self.label = the_plan, mode, ledger, label
        plain = DataLoader(
            rows, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG off": see README Privacy
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
            self.module, self.optimizer, self.loader = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=plain,
                noise_multiplier=the_plan.noise_multiplier,
                max_grad_norm=the_plan.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=mode,
                noise_generator=torch.Generator(device=next(model.parameters()).device).manual_seed(
                    seed + 7
                ),
            )
        if abs(self.loader.sample_rate - the_plan.sample_rate) > 1e-12:
            raise PrivacyError("Opacus chose a different sample rate than planned", "internal")

    def steps_taken(self) -> int:
        return sum(n for _, _, n in self.engine.accountant.history)

    def close(self, status: str, model: nn.Module) -> dict:
        """Record what was released; detach Opacus from the model. Returns the ledger entry."""
        p = self.plan
        taken = self.steps_taken()
        epsilon_session = float(self.engine.accountant.get_epsilon(p.delta)) if taken else 0.0
        history = (self.ledger.history() if self.ledger else []) + [
            (p.noise_multiplier, p.sample_rate, taken)
        ]
        from opacus import __version__ as opacus_version

        from remdr import __version__

        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **self.label,
            "status": status,
            "unit": UNIT,
            "relation": RELATION,
            "mechanism": MECHANISM,
            "accountant": ACCOUNTANT,
            "opacus": opacus_version,
            "remdr": __version__,
            "grad_sample_mode": self.mode,
            "patients": p.patients,
            "noise_multiplier": p.noise_multiplier,
            "max_grad_norm": p.max_grad_norm,
            "sample_rate": p.sample_rate,
            "steps": taken,
            "delta": p.delta,
            "epsilon_session": epsilon_session,
            "epsilon_cumulative": epsilon_of(history, p.delta),
        }
        if self.ledger is not None:
            self.ledger.append(entry)
        _unwrap(self.module, model)
        return entry


def privacy_report(path: str | Path, delta: float | None = None) -> str:
    """The ledger as a privacy officer reads it: every release, the total, what is not covered."""
    ledger = PrivacyLedger(path)
    entries = ledger.entries()
    lines = [f"privacy ledger: {ledger.path}"]
    if not entries:
        return "\n".join(lines + ["no private training has used this site's data yet (epsilon 0)"])
    d = delta if delta is not None else float(entries[-1]["delta"])
    lines += [
        f"unit of privacy: {entries[-1]['unit']}; neighbouring datasets: {entries[-1]['relation']}",
        f"mechanism: {entries[-1]['mechanism']}; accountant: {ACCOUNTANT.upper()} (Opacus)",
        "",
        f"{'time (UTC)':20} {'run':>6} {'round':>5} {'method':10} {'status':9} {'patients':>8} "
        f"{'sigma':>6} {'C':>5} {'q':>7} {'steps':>6} {'eps (cum.)':>10}",
    ]
    history: History = []
    for e in entries:
        history.append(release_of(e))
        lines.append(
            f"{e.get('time', ''):20} {str(e.get('run', '-'))[-6:]:>6} {e.get('round', '-')!s:>5} "
            f"{e.get('method', '-'):10} {e.get('status', '-'):9} {e.get('patients', 0):>8} "
            f"{e['noise_multiplier']:>6.3g} {e['max_grad_norm']:>5.3g} {e['sample_rate']:>7.4f} "
            f"{e['steps']:>6} {epsilon_of(history, d):>10.3f}"
        )
    total = epsilon_of(history, d)
    last = history[-1]
    lines += [
        "",
        f"total: epsilon = {total:.3f} at delta = {d:g} over {len(entries)} releases "
        f"({sum(h[2] for h in history)} noisy steps)",
        f"one more release like the last would bring it to {epsilon_of(history + [last], d):.3f}",
        "",
        "not covered by this guarantee:",
        *(f"  - {item}" for item in NOT_COVERED),
    ]
    return "\n".join(lines)
