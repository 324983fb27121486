"""One private training: check, plan, wrap with Opacus, and record what was released.

`open_private` is the one call a trainer makes (like Opacus' `PrivacyEngine.make_private`): it
holds the site's ledger, checks per-sample gradients on the real model, plans sigma/q/steps
against the ledger (declining training that would pass the ceiling before any step is taken),
and returns a `PrivateSession` whose loader, module and optimizer the trainer uses. `close`
appends the ledger entry and lets go of the ledger, also when training fails part-way: the steps
taken were released to the optimiser.

The Poisson sampling, the noise and the eye per patient are drawn from OS entropy fresh for each
session (`randomness`), never from the run seed: the coordinator chooses and knows that seed,
and it is the same at every site.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from remdr.config import PrivacyConfig, TrainConfig
from remdr.errors import PrivacyError
from remdr.privacy.accounting import (
    ACCOUNTANT,
    MECHANISM,
    RELATION,
    UNIT,
    History,
    PrivacyPlan,
    epsilon_of,
    plan,
)
from remdr.privacy.gradcheck import LossFn, choose_grad_sample_mode, probe_batch, unwrap_model
from remdr.privacy.ledger import LedgerHold, PrivacyLedger
from remdr.privacy.quiet_opacus import import_opacus
from remdr.privacy.randomness import COVERS, RANDOMNESS, private_generator
from remdr.privacy.sampling import PatientRows


def empty_safe_collate(collate: Callable, example: dict[str, torch.Tensor]) -> Callable:
    """`collate`, except that an empty batch becomes a dict of zero-row tensors shaped like
    `example` (one item), which the training loop takes as a noise-only step."""
    empty = {k: torch.zeros((0, *v.shape), dtype=v.dtype) for k, v in example.items()}

    def collate_or_empty(batch: list):
        if len(batch) == 0:
            return {k: v.clone() for k, v in empty.items()}
        return collate(batch)

    return collate_or_empty


class PrivateSession:
    """Opacus around one `fit`: Poisson loader over patients, clipped and noised steps, and a
    ledger entry when it ends (also when it fails: steps taken were released to the optimiser).

    Sampling and noise come from generators seeded with OS entropy here, never from a
    configured seed; `hold` (the ledger's lock, if any) is released by `close`."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        rows: PatientRows,
        privacy_plan: PrivacyPlan,
        grad_sample_mode: str,
        ledger: PrivacyLedger | None,
        batch_size: int,
        label: dict,
        spent: History = (),
        hold: LedgerHold | None = None,
    ) -> None:
        import_opacus()
        from opacus import PrivacyEngine

        self.plan, self.mode, self.ledger, self.label, self.hold = (
            privacy_plan,
            grad_sample_mode,
            ledger,
            label,
            hold,
        )
        self.spent = list(spent)  # the ledger's history when planned; held, so it cannot change
        device = next(model.parameters()).device
        # Opacus' Poisson sampler draws from the plain loader's generator
        plain = DataLoader(rows, batch_size=batch_size, shuffle=True, generator=private_generator())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG off": see docs/privacy.md, "Not covered"
            self.engine = PrivacyEngine(accountant=ACCOUNTANT)
            self.module, self.optimizer, self.loader = self.engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=plain,
                noise_multiplier=privacy_plan.noise_multiplier,
                max_grad_norm=privacy_plan.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=grad_sample_mode,
                noise_generator=private_generator(device),
            )
        # Opacus builds an empty first batch from `dataset[0]` as if it were a tuple; ours are
        # dicts, so an empty Poisson batch (still a noised step) gets our own empty dict instead
        self.loader.collate_fn = empty_safe_collate(self.loader.collate_fn, rows[0])
        if abs(self.loader.sample_rate - privacy_plan.sample_rate) > 1e-12:
            raise PrivacyError("Opacus chose a different sample rate than planned", "internal")

    def steps_taken(self) -> int:
        return sum(n for _, _, n in self.engine.accountant.history)

    def close(self, status: str, model: nn.Module) -> dict:
        """Record what was released, let go of the ledger, detach Opacus from the model.
        Returns the ledger entry."""
        try:
            return self._close(status, model)
        finally:
            if self.hold is not None:
                self.hold.release()

    def _close(self, status: str, model: nn.Module) -> dict:
        p = self.plan
        taken = self.steps_taken()
        epsilon_session = float(self.engine.accountant.get_epsilon(p.delta)) if taken else 0.0
        history = [*self.spent, (p.noise_multiplier, p.sample_rate, taken)]
        import_opacus()
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
            "randomness": RANDOMNESS,
            "randomness_covers": list(COVERS),
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
        unwrap_model(self.module, model)
        return entry


def open_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_ds: Dataset,
    *,
    loss_fn: LossFn,
    method_name: str,
    train_cfg: TrainConfig,
    privacy: PrivacyConfig,
    epochs: int,
    planned_rounds: int = 1,
    label: dict | None = None,
) -> PrivateSession:
    """Check per-sample gradients, plan sigma/q/steps against the ledger, wrap with Opacus.

    `train_ds` yields one eye per item and its `records[i].patient_id` names the patient of item
    i; `loss_fn(model, batch)` is the scalar training loss. The ledger entry is labelled with
    `method_name` and `label` (e.g. run and round). The ledger is held from the ceiling check to
    the session's `close`: a second training at the site meanwhile declines (PrivacyError).
    `train_cfg.seed` is not used: the private randomness never comes from a configured seed."""
    rows = PatientRows(train_ds, (r.patient_id for r in train_ds.records))
    ledger = PrivacyLedger(privacy.dp_ledger) if privacy.dp_ledger else None
    hold = ledger.hold() if ledger else None
    try:
        spent = ledger.history() if ledger else []
        the_plan = plan(
            privacy,
            spent,
            patients=len(rows),
            batch_size=train_cfg.batch_size,
            epochs=epochs,
            planned_rounds=planned_rounds,
        )
        device = next(model.parameters()).device
        probe = {k: v.to(device) for k, v in probe_batch(train_ds[0]).items()}
        mode = choose_grad_sample_mode(model, loss_fn, probe, requested=privacy.dp_grad_sample_mode)
        return PrivateSession(
            model,
            optimizer,
            rows=rows,
            privacy_plan=the_plan,
            grad_sample_mode=mode,
            ledger=ledger,
            batch_size=train_cfg.batch_size,
            label={"method": method_name, **(label or {})},
            spent=spent,
            hold=hold,
        )
    except BaseException:
        if hold is not None:
            hold.release()
        raise
