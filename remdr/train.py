"""The one training loop every method uses, plus evaluation and prediction."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from remdr.config import PrivacyConfig, TrainConfig
from remdr.data.dataset import EyeDataset
from remdr.data.transforms import augment_image
from remdr.errors import ConfigError
from remdr.head_blend import probe_metrics
from remdr.methods import Method, presence
from remdr.metrics import scored_metrics
from remdr.model import ReM3Dr, model_part
from remdr.optim import DriftControl, proximal_term
from remdr.registry import MODALITIES
from remdr.runtime import autocast_for, to_device

log = logging.getLogger(__name__)


def make_loader(
    ds: EyeDataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    device: torch.device,
    num_workers: int = 0,
) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=shuffle and len(ds) > batch_size,  # a batch of one breaks the contrastive loss
        generator=gen,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
    )


def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """One group per learning-rate multiplier (`lr_scale`): each modality's branch and head at
    `lr-<modality>-scale`, everything else at 1; a single group when every scale is 1. Named,
    so a saved state says which parameters its moments belong to (`moments_fit`)."""
    scales = {"oct": cfg.lr_oct_scale, "fundus": cfg.lr_fundus_scale}
    groups: dict[float, list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(model_part(name), 1.0), []).append((name, p))
    return [{"params": ps, "lr_scale": scale} for scale, ps in groups.items()]


def moments_fit(optimizer: torch.optim.Optimizer, state: dict) -> bool:
    """Whether a saved optimizer state is for exactly this optimizer's parameters, group by
    group. A site trains only the parts it has eyes for, so its trainable set changes when its
    data does (an OCT-only site's first complete eye unfreezes the fusion head); torch would
    load moments of the wrong parameters whenever the counts happened to match. A state saved
    without names is judged, as torch judges it, by the group sizes."""
    saved, now = state["param_groups"], optimizer.param_groups
    if len(saved) != len(now):
        return False
    if any("param_names" not in g for g in saved):
        return all(len(a["params"]) == len(b["params"]) for a, b in zip(saved, now, strict=True))
    return all(a["param_names"] == b.get("param_names") for a, b in zip(saved, now, strict=True))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(
    step: int, total: int, cfg: TrainConfig, window: tuple[float, float] = (0.0, 1.0)
) -> float:
    """Cosine decay to 5% of lr after a 3% warm-up; constant when asked.

    `window` is the part of one longer schedule that these `total` steps cover: a federated
    round r of R trains ((r-1)/R, r/R) of the federation's schedule, so the whole federation
    follows one warm-up and one decay instead of restarting them every round."""
    start, end = window
    if end - start < 1.0:  # this training is one slice of a longer schedule
        span = total / max(end - start, 1e-9)
        step, total = int(start * span) + step, max(1, round(span))
    if cfg.schedule == "constant" or total <= 1:
        return cfg.lr
    warm = max(1, int(0.03 * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def predict(model: ReM3Dr, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Predictions in dB for every item: ``pred`` and each modality's ``pred_<m>``, plus ``md``
    and ``has_<m>`` (which images the eye has). A prediction the model has no input for (a
    unimodal model on an eye without its image, a head of an absent modality) is NaN."""
    model.eval()
    autocast = autocast_for(device)
    keys = ["pred"] + [f"pred_{m}" for m in model.modalities]
    flags = [f"has_{m}" for m in MODALITIES]
    outs: dict[str, list[np.ndarray]] = {k: [] for k in keys + flags + ["md"]}
    for batch in loader:
        batch = to_device(batch, device)
        present = presence(batch)
        with autocast():
            out = model(batch.get("oct"), batch.get("fundus"), present=present)
        n = len(batch["md"])
        has = {m: (present or {}).get(m, torch.ones(n, dtype=torch.bool)).cpu() for m in MODALITIES}
        for k in keys:
            pred = model.to_db(out[k].float()).cpu()
            usable = _usable_rows(k, model.modalities, has)
            outs[k].append(torch.where(usable, pred, torch.nan).numpy())
        for m in MODALITIES:
            outs[f"has_{m}"].append(has[m].numpy())
        outs["md"].append(batch["md"].cpu().numpy())
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in outs.items()}


def _usable_rows(
    key: str, modalities: tuple[str, ...], has: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Rows where output `key` rests on an image the eye has: the fused output needs any image
    the model reads, a head its own modality."""
    needed = [key.removeprefix("pred_")] if key != "pred" else list(modalities)
    usable = torch.zeros_like(has[MODALITIES[0]])
    for m in needed:
        usable |= has[m]
    return usable


def evaluate(model: ReM3Dr, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Metrics of the model's output, plus each modality head's MSE (`mse_<m>`)."""
    preds = predict(model, loader, device)
    metrics = scored_metrics(preds)  # a unimodal model scores the eyes it can see
    for m in model.modalities:
        if len(model.modalities) > 1:
            rows = np.isfinite(preds[f"pred_{m}"])
            err = (preds[f"pred_{m}"][rows] - preds["md"][rows]) ** 2
            metrics[f"mse_{m}"] = float(err.mean()) if rows.any() else float("nan")
    if getattr(model, "blends", False) and not model.head_blend.any():
        metrics.update(probe_metrics(preds, model.modalities))  # what `head-blend` chooses by
    return metrics


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val_mse: float = float("inf")
    seconds: float = 0.0
    n_steps: int = 0
    stopped_early: bool = False  # validation MSE stopped improving (`patience`)
    privacy: dict | None = None  # the ledger entry of a private method's training
    optimizer_state: dict | None = None  # AdamW's state at the end (plain training only)


def fit(
    model: ReM3Dr,
    method: Method,
    train_ds: EyeDataset,
    *,
    cfg: TrainConfig,
    device: torch.device,
    val_ds: EyeDataset | None = None,
    epochs: int | None = None,
    augment: float = 1.0,
    keep_best: bool = True,
    progress: bool = True,
    desc: str = "train",
    proximal: tuple[float, dict[str, torch.Tensor]] | None = None,
    privacy: PrivacyConfig | None = None,
    planned_rounds: int = 1,
    ledger_label: dict | None = None,
    schedule_window: tuple[float, float] = (0.0, 1.0),
    optimizer_state: dict | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    steps: int = 0,
    control: DriftControl | None = None,
) -> FitResult:
    """Train `model` in place with `method` for `epochs` (default `cfg.epochs`), or for exactly
    `steps` optimiser steps when `steps` > 0 (as many passes over the data as that takes: a
    federated site's fixed local work per round, whatever its size).

    With a validation set, the weights of the epoch with the lowest validation MSE are kept
    (`keep_best`); without one, the last weights are kept. `proximal=(mu, anchor)` adds
    FedProx's proximal term towards the anchor parameters. `schedule_window` places this
    training inside a longer learning-rate schedule (`lr_at`); `optimizer_state` resumes AdamW's
    moments from an earlier training (a site's previous round) and the result carries the new
    ones (not for a private method, whose optimiser is Opacus'). `on_epoch(epoch, seconds)` is
    called after each epoch with the training seconds so far (its own time is not counted).
    `control` corrects every step for a federated site's drift (SCAFFOLD, `DriftControl`).

    A private method trains under DP-SGD with `privacy` (one Poisson-sampled row per patient)
    and keeps the last weights: picking an epoch on private validation data is not covered by
    the guarantee. `planned_rounds` sizes sigma when a target epsilon is set; the ledger entry
    (labelled with `ledger_label`) is written even if training fails part-way. Its randomness
    (sampling, noise, augmentation, dropout) comes from OS entropy, not `cfg.seed`: two private
    trainings never repeat each other, while plain training is reproducible from `cfg.seed`.
    """
    epochs = epochs or cfg.epochs
    if steps and method.spec.private:
        raise ConfigError(
            f"local-steps={steps} with the private method {method.name}",
            "DP-SGD's accounting counts whole Poisson-sampled epochs",
            "use local-epochs with a private method (local-steps=0)",
        )
    optimizer = make_optimizer(model, cfg)
    if optimizer_state and not method.spec.private:
        if moments_fit(optimizer, optimizer_state):
            optimizer.load_state_dict(optimizer_state)
        else:
            log.warning(
                "the saved AdamW moments are for other parameters than this training's "
                "(the site's eyes now train other parts of the model); starting new ones"
            )
    session = None
    aug_gen = torch.Generator().manual_seed(cfg.seed + 1)
    rng_scope: AbstractContextManager = nullcontext()
    if method.spec.private:
        # lazily: plain training never loads DP code
        from remdr.privacy import open_private, private_generator, private_global_rng

        aug_gen, rng_scope = private_generator(), private_global_rng(device)

        session = open_private(
            model,
            optimizer,
            train_ds,
            loss_fn=lambda m, b: method.loss(m, b)[0],
            method_name=method.name,
            train_cfg=cfg,
            privacy=privacy or PrivacyConfig(),
            epochs=epochs,
            planned_rounds=planned_rounds,
            label=ledger_label,
        )
        loader, train_model, optimizer = session.loader, session.module, session.optimizer
        keep_best = False
    else:
        loader = make_loader(
            train_ds,
            cfg.batch_size,
            shuffle=True,
            seed=cfg.seed,
            device=device,
            num_workers=cfg.num_workers,
        )
        train_model = model
    try:
        with rng_scope:
            result = _train_epochs(
                model, train_model, method, loader, optimizer, val_ds, cfg, device,
                epochs=epochs, augment=augment, keep_best=keep_best, progress=progress,
                desc=desc, proximal=proximal, aug_gen=aug_gen, window=schedule_window,
                on_epoch=on_epoch, steps=steps, control=control,
            )  # fmt: skip
    except BaseException:
        if session is not None:
            session.close("aborted", model)
        raise
    if session is not None:
        result.privacy = session.close("completed", model)
    else:
        result.optimizer_state = optimizer.state_dict()
    return result


def _train_epochs(
    model: ReM3Dr,
    train_model: torch.nn.Module,
    method: Method,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    val_ds: EyeDataset | None,
    cfg: TrainConfig,
    device: torch.device,
    *,
    epochs: int,
    augment: float,
    keep_best: bool,
    progress: bool,
    desc: str,
    proximal: tuple[float, dict[str, torch.Tensor]] | None,
    aug_gen: torch.Generator,
    window: tuple[float, float],
    on_epoch: Callable[[int, float], None] | None = None,
    steps: int = 0,
    control: DriftControl | None = None,
) -> FitResult:
    val_loader = (
        make_loader(
            val_ds,
            cfg.batch_size * 2,
            shuffle=False,
            seed=cfg.seed,
            device=device,
            num_workers=cfg.num_workers,
        )
        if val_ds is not None and len(val_ds)
        else None
    )
    autocast = autocast_for(device)
    regulariser = proximal_term(model, proximal[1], proximal[0]) if proximal else None
    if steps:  # exactly `steps` steps, over as many passes as they take
        epochs = math.ceil(steps / max(1, len(loader)))
    total = steps or epochs * len(loader)
    result, best_state = FitResult(), None
    start, step = time.perf_counter(), 0
    interactive = progress and sys.stderr.isatty()  # a bar on a terminal, a line per epoch in logs
    bar = tqdm(total=total, desc=desc, disable=not interactive, leave=False, dynamic_ncols=True)
    for epoch in range(epochs):
        model.train()
        sums: dict[str, float] = {}
        n_batches = 0
        for batch in loader:
            if step == total:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg, window) * group.get("lr_scale", 1.0)
            batch = to_device(batch, device)
            if augment and len(batch["md"]):
                for m in model.modalities:
                    batch[m] = augment_image(batch[m], aug_gen, float(augment))
            parts = method.step(
                train_model, optimizer, batch, epoch, autocast, regulariser, control=control
            )
            step += 1
            bar.update(1)
            if "loss" not in parts:  # a noise-only step on an empty Poisson batch
                continue
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            n_batches += 1
            bar.set_postfix(epoch=epoch + 1, loss=f"{parts['loss']:.3f}")
        record = {
            "epoch": epoch + 1,
            **{f"train_{k}": v / max(1, n_batches) for k, v in sums.items()},
        }
        if val_loader is not None:
            val = evaluate(model, val_loader, device)
            record.update(
                {f"val_{k}": v for k, v in val.items() if k in ("mse", "mae", "mae_bin_avg")}
            )
            if val["mse"] < result.best_val_mse:
                result.best_val_mse, result.best_epoch = val["mse"], epoch + 1
                if keep_best:
                    best_state = copy.deepcopy(model.state_dict())
            bar.set_postfix(epoch=epoch + 1, val_mse=f"{val['mse']:.2f}")
            stale = epoch + 1 - result.best_epoch
            result.stopped_early = keep_best and 0 < cfg.patience <= stale < epochs - epoch - 1
        result.history.append(record)
        if on_epoch is not None:
            paused_at = time.perf_counter()
            on_epoch(epoch + 1, paused_at - start)
            start += time.perf_counter() - paused_at  # the callback's time is not training
        if progress and not interactive:
            val_note = f", val MSE {record['val_mse']:.2f}" if "val_mse" in record else ""
            log.info(
                "%s epoch %d/%d: loss %.3f%s",
                desc,
                epoch + 1,
                epochs,
                record["train_loss"],
                val_note,
            )
        if result.stopped_early:
            log.info(
                "%s: stopped after epoch %d, no better validation MSE for %d epochs (best: "
                "epoch %d)", desc, epoch + 1, cfg.patience, result.best_epoch,
            )  # fmt: skip
            break
    bar.close()
    if best_state is not None:
        model.load_state_dict(best_state)
    result.seconds = time.perf_counter() - start
    result.n_steps = step
    return result
