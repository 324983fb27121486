"""Per-sample gradients, checked: Opacus' per-row gradients against one-row-at-a-time autograd.

Clipping bounds a patient's influence only if the gradients Opacus clips are the true per-row
gradients. They are checked on the real model (on random inputs shaped like a training item, so
the check never touches private data), never assumed; a model that fails in every mode is refused.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from remdr.errors import PrivacyError
from remdr.privacy.quiet_opacus import import_opacus

CHECK_TOLERANCE = 1e-5  # relative error allowed (float64) between Opacus' and one-at-a-time
MODES = ("hooks", "ew")

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> scalar


def wrap_model(model: nn.Module, mode: str) -> nn.Module:
    """`model` with Opacus' grad samplers attached: backward fills `p.grad_sample` (B, *p.shape)."""
    import_opacus()
    from opacus.grad_sample.utils import wrap_model as opacus_wrap_model

    return opacus_wrap_model(model, mode, batch_first=True, loss_reduction="mean")


def unwrap_model(wrapped: nn.Module, model: nn.Module) -> None:
    """Detach Opacus' hooks from `model` and clear its gradients and per-sample gradients."""
    if hasattr(wrapped, "_close"):
        wrapped._close()
    for p in model.parameters():
        p.grad_sample = None
        p.grad = None


def per_sample_gradient_error(
    model: nn.Module, loss_fn: LossFn, batch: dict[str, torch.Tensor], *, mode: str
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
    wrapped = wrap_model(model, mode)
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
        unwrap_model(wrapped, model)


def choose_grad_sample_mode(
    model: nn.Module,
    loss_fn: LossFn,
    batch: dict[str, torch.Tensor],
    *,
    requested: str = "auto",
) -> str:
    """The first grad-sample mode whose per-sample gradients pass the check on this model."""
    failures = []
    for mode in MODES if requested == "auto" else (requested,):
        try:
            err = per_sample_gradient_error(model, loss_fn, batch, mode=mode)
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


def probe_batch(example: dict[str, torch.Tensor], *, n: int = 4, seed: int = 0) -> dict:
    """Random inputs shaped like one training item: the check never touches private data."""
    gen = torch.Generator().manual_seed(seed)
    out = {
        k: torch.randn((n, *v.shape), generator=gen)
        for k, v in example.items()
        if k in ("oct", "fundus")
    }
    out["md"] = torch.rand(n, generator=gen) * 35 - 30
    return out
