"""What one site does in a federated round, without Flower: load its data, train, evaluate.

The Flower ClientApp (`remdr.client`) only translates messages to and from these calls, so the
same code runs under the simulator, in deployment and in unit tests.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from remdr.config import ExperimentConfig
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.data.loading import Dataset
from remdr.data.preprocessed import warm
from remdr.data.records import EyeRecord
from remdr.data.splits import split_by_key, split_records
from remdr.errors import RemdrError, TrainingError
from remdr.federation.run_config import FedConfig
from remdr.federation.screening import PART_COUNTS
from remdr.federation.site_state import Carried
from remdr.head_blend import PROBE_PREFIX
from remdr.head_refit import refittable, split_sums, to_arrays, withheld
from remdr.methods import build_model, create_method
from remdr.metrics import BINS, regression_metrics
from remdr.model import model_part
from remdr.optim import DriftControl
from remdr.runtime import prepare_model, resolve_device, seed_everything
from remdr.train import evaluate, fit, make_loader

log = logging.getLogger(__name__)

# -- a site's data -----------------------------------------------------------------------------


@dataclass
class SiteData:
    dataset: Dataset
    train: EyeDataset
    val: EyeDataset  # the site's validation patients: the only data any choice may look at
    test: EyeDataset  # the site's own shipped test/ split (maybe empty): reported, never chosen on


def load_site(
    data_path: str | Path,
    cfg: ExperimentConfig,
    seed: int = 0,
    *,
    cache: bool = False,
    split_key: bytes | None = None,
) -> SiteData:
    """The site's records split by patient into local train and validation sets.

    A site that ships its own splits keeps its `test/` patients apart: they are never trained
    on, never validated on (so never select a model), only reported. Without a shipped `val/`,
    validation patients are split off its `train/` records. With `cache`, the decoded tensors
    come from (or go to) the site's preprocessed cache on its disk (`remdr.data.preprocessed`).
    With `split_key` (the site's own), validation patients are drawn by a keyed hash of their
    ids (`split_by_key`), never by the coordinator's `seed`."""
    ds = load_dataset(data_path, cfg.data, quiet=True)

    def draw(records: list[EyeRecord]) -> dict[str, list[EyeRecord]]:
        if split_key is not None:
            return split_by_key(records, cfg.data.val_fraction, split_key)
        return split_records(records, cfg.data.val_fraction, 0.0, seed)

    test: list = []
    if ds.has_splits:
        parts = split_records(ds.records, 0, 0, seed)
        train, val, test = parts["train"], parts["val"], parts["test"]
        if not val:
            parts = draw([dataclasses.replace(r, split="") for r in train])
            train, val = parts["train"], parts["val"]
    else:
        parts = draw(ds.records)
        train, val = parts["train"], parts["val"]
    site = SiteData(
        ds, EyeDataset(train, cfg.data), EyeDataset(val, cfg.data), EyeDataset(test, cfg.data)
    )
    if cache:  # decoded once on this machine, then read back by every later round's process
        warm([site.train, site.val, site.test], cfg.data, name=str(Path(data_path).resolve()))
    return site


# -- one round at a site ----------------------------------------------------------------------

RECEIVED = "received-"  # metric prefix: the site's validation of the model it was sent
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def norm_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of normalisation layers (parameters and running statistics): FedBN's local part."""
    keys = []
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys += [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]
    return keys


def eye_counts(records: Sequence[EyeRecord]) -> dict[str, int]:
    """The reply's `eyes-*` metrics: training eyes with OCT, with fundus and with both. They
    say which parts of the model this site's training can move (`PART_COUNTS`), and weigh
    each part in the coordinator's aggregate."""
    return {
        "eyes-oct": sum("oct" in r.modalities for r in records),
        "eyes-fundus": sum("fundus" in r.modalities for r in records),
        "eyes-complete": sum("oct" in r.modalities and "fundus" in r.modalities for r in records),
    }


def untrained_keys(keys: Iterable[str], counts: dict[str, int]) -> list[str]:
    """The state-dict keys of the parts no training eye of this site reaches: a modality's
    branch without an eye that has the image, the fusion head without a complete eye."""
    untrained = {part for part, metric in PART_COUNTS.items() if counts[metric] == 0}
    return [k for k in keys if model_part(k) in untrained]


def restore_untrained(
    model: nn.Module, global_state: dict[str, torch.Tensor], counts: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Put the parts this site has no data for back to the received global values in `model`
    (so the site validates what it sends); return those values exactly (dtype too: the
    coordinator's screening compares them) for the reply. `freeze_untrained` kept their
    parameters still; this also puts back their buffers and the received dtypes (FedAvg hands
    integer counters back as floats), since the coordinator aggregates a part only over the
    sites that trained it."""
    keys = untrained_keys(global_state, counts)
    if keys:
        model.load_state_dict({k: global_state[k] for k in keys}, strict=False)
    return {k: global_state[k].detach().cpu().clone().contiguous() for k in keys}


def freeze_untrained(model: nn.Module, counts: dict[str, int]) -> None:
    """Stop the local steps moving the parts this site sends back as received (`untrained_keys`).
    At a one-modality site the fusion head still gets gradients
    (through the absent modality's embedding), and training it locally would let the site's
    encoder co-adapt, over the round's steps, to a head the coordinator never sees. Frozen, the
    encoder learns against the federation's head."""
    frozen = set(untrained_keys(dict(model.named_parameters()), counts))
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]  # the trained weights: sent
    metrics: dict[str, float]  # sent
    carried: Carried = field(default_factory=Carried)  # kept at the site for its next round
    control_delta: dict[str, torch.Tensor] | None = None  # SCAFFOLD: the change of c_i, sent

    @property
    def method_state(self) -> dict:
        return self.carried.method or {}


def _metrics_record(prefix: str, m: dict[str, float]) -> dict[str, float]:
    keys = ["mse", "mae", "mae_bin_avg"] + [f"mae_{b}" for b in BINS]
    if prefix == "val":  # `head-blend`'s probes: the coordinator chooses the blend by them
        keys += [k for k in m if k.startswith(PROBE_PREFIX)]
    return {f"{prefix}-{k.replace('_', '-')}": float(m.get(k, float("nan"))) for k in keys}


def one_line_failures(what: str):
    """Any failure inside the decorated call becomes one line: a `TrainingError` naming the
    cause (a `RemdrError` passes unchanged), which the ClientApp sends as its error reply. The
    traceback stays in the site's own log."""

    def decorate(call):
        @functools.wraps(call)
        def wrapper(*args, **kwargs):
            try:
                return call(*args, **kwargs)
            except RemdrError:
                raise
            except Exception as err:
                label = f"{what} {kwargs['server_round']}" if "server_round" in kwargs else what
                log.exception("%s failed at this site", label)
                cause = " ".join(f"{type(err).__name__}: {err}".split())
                cause = cause if len(cause) <= 300 else cause[:297] + "..."
                raise TrainingError(
                    f"{label} failed at this site", cause, "the site's log has the traceback"
                ) from err

        return wrapper

    return decorate


def warmup_share(fed: FedConfig, server_round: int) -> float:
    """The share of lr round `server_round` trains at (`warmup-rounds`); a function of the
    round alone, so a resumed run trains every round at the lr it would have."""
    return min(1.0, server_round / fed.warmup_rounds) if fed.warmup_rounds > 0 else 1.0


@one_line_failures("round")
def train_round(
    cfg: ExperimentConfig,
    fed: FedConfig,
    global_state: dict[str, torch.Tensor],
    site: SiteData,
    *,
    server_round: int = 1,
    carried: Carried | None = None,
    server_control: dict[str, torch.Tensor] | None = None,
    ledger_label: dict | None = None,
) -> RoundResult:
    """Train the global model on this site for `fed.local_epochs` (or exactly `fed.local_steps`
    steps); return weights and metrics.

    Unless `fed.separate_evaluate`, the received model is first validated on the site's
    held-out patients (`received-*` metrics: the previous round's global model), so a round
    needs one message per site instead of a train and an evaluate message.

    A private method trains under the site's `cfg.privacy` (ledger, ceiling) and reports the
    site's cumulative epsilon; a round that would break the ceiling raises PrivacyError first.
    The round's seed (`seed + 1000 * round`, the same at every site) drives only non-private
    training: a private method's sampling and noise come from this site's OS entropy, and it
    sends no statistic of its labels in `method_state`. Every failure is one `RemdrError` line.

    `carried` is what the site's previous round of this run left (EMA scores, FedBN layers,
    AdamW moments, SCAFFOLD's c_i); with `fed.drift_control == "scaffold"` every step is
    corrected by `server_control` - c_i and the reply carries the change of c_i.
    """
    carried = carried or Carried()
    device = resolve_device(cfg.train.device)
    seed = cfg.train.seed + 1000 * server_round
    seed_everything(seed, device)
    train_cfg = dataclasses.replace(
        cfg.train, seed=seed, lr=cfg.train.lr * warmup_share(fed, server_round)
    )
    rounds = max(fed.num_server_rounds, server_round)
    window = ((server_round - 1) / rounds, server_round / rounds)  # one schedule for the run
    method = create_method(cfg.train.method, cfg.method)
    method.setup(site.train.targets(), seed=seed)
    method.fused_off = server_round <= fed.unimodal_rounds
    if carried.method:
        method.scores.load_state_dict(carried.method["scores"])
    model = build_model(cfg, method)
    model.load_state_dict(global_state)
    if fed.fedbn and carried.local:
        model.load_state_dict(carried.local, strict=False)
    counts = eye_counts(site.train.records)
    freeze_untrained(model, counts)
    model = prepare_model(model, device)
    received = {}
    if not fed.separate_evaluate:
        scores = evaluate_site(model, site, cfg, device, test=True)
        received = {f"{RECEIVED}{k}": v for k, v in scores.items()}
        model.train()  # evaluation left it in eval mode; Opacus wraps only a training model
    anchor = {k: v.detach().clone().to(device) for k, v in model.named_parameters()}
    mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
    control = (
        DriftControl(model, server_control, carried.control)
        if fed.drift_control == "scaffold"
        else None
    )
    start = time.perf_counter()
    result = fit(
        model,
        method,
        site.train,
        cfg=train_cfg,
        device=device,
        epochs=fed.local_epochs,
        steps=max(0, fed.local_steps),  # -1 (auto) resolves in split_run_config
        augment=cfg.data.augment_scale,
        keep_best=False,
        progress=False,
        proximal=(mu, anchor) if mu > 0 else None,
        privacy=cfg.privacy,
        planned_rounds=fed.num_server_rounds,
        ledger_label={"round": server_round, **(ledger_label or {})},
        schedule_window=window,
        optimizer_state=carried.optimizer if fed.keep_site_optimizer else None,
        control=control,
    )
    seconds = time.perf_counter() - start
    restored = restore_untrained(model, global_state, counts)  # frozen, so unchanged but exact
    metrics = {
        "num-examples": len(site.train),
        **counts,
        "unit-weight": 1.0,  # equal weights: site-level DP's sensitivity assumes them
        "skipped-records": site.dataset.report.n_bad,  # corrupt or invalid files, not used
        "train-loss": float(result.history[-1].get("train_loss", float("nan"))),
        "train-seconds": seconds,
        "train-steps": result.n_steps,
    }
    if result.privacy:
        p = result.privacy
        metrics.update(
            {
                "dp-epsilon": p["epsilon_cumulative"],
                "dp-delta": p["delta"],
                "dp-noise": p["noise_multiplier"],
                "dp-clip": p["max_grad_norm"],
                "dp-sample-rate": p["sample_rate"],
                "dp-steps": p["steps"],
            }
        )
    if fed.local_validation or fed.separate_evaluate:  # else the next round scores the model
        metrics.update(evaluate_site(model, site, cfg, device))
    metrics.update(received)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    state.update(restored)  # the received values and dtypes, exactly
    local = {k: state[k] for k in norm_state_keys(model)} if fed.fedbn else None
    kept = result.optimizer_state if fed.keep_site_optimizer else None
    new_control, delta = None, None
    if control is not None:
        new_control = control.updated_local()
        delta = {k: (v - control.local[k].cpu()).contiguous() for k, v in new_control.items()}
    return RoundResult(
        state, metrics, Carried(method.state_dict(), local, kept, new_control), delta
    )


def evaluate_site(
    model, site: SiteData, cfg: ExperimentConfig, device, *, test: bool = False
) -> dict[str, float]:
    """Validation metrics of the site's held-out patients (`val-*` keys, plus `num-val`); with
    `test`, also its own test split (`test-*`, `num-test`) when it ships one."""
    out: dict[str, float] = {}
    parts = [("val", site.val)] + ([("test", site.test)] if test and len(site.test) else [])
    for name, data in parts:
        loader = make_loader(data, cfg.train.batch_size * 2, shuffle=False, seed=0, device=device)
        m = (
            evaluate(model, loader, device)
            if len(data)
            else regression_metrics(np.zeros(0), np.zeros(0))
        )
        out.update({f"num-{name}": len(data), **_metrics_record(name, m)})
    return out


@one_line_failures("evaluation")
def evaluate_global(
    cfg: ExperimentConfig,
    global_state: dict[str, torch.Tensor],
    site: SiteData,
    local_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    device = resolve_device(cfg.train.device)
    model = _received_model(cfg, global_state, local_state, device)
    return evaluate_site(model, site, cfg, device, test=True)


def _received_model(cfg: ExperimentConfig, global_state, local_state, device) -> nn.Module:
    """The coordinator's model as this site runs it: with its own layers where it keeps some."""
    model = build_model(cfg, create_method(cfg.train.method, cfg.method))
    model.load_state_dict(global_state)
    if local_state:
        model.load_state_dict(local_state, strict=False)
    return prepare_model(model, device)


@one_line_failures("head statistics")
def head_statistics(
    cfg: ExperimentConfig,
    global_state: dict[str, torch.Tensor],
    site: SiteData,
    local_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """`head-refit`'s sums for the model the coordinator chose (`remdr.head_refit`): each
    head's Gram of hidden activations and labels over this site's training eyes
    (`train-<head>-gram`, `train-<head>-n`) and validation eyes (`val-*`)."""
    if not cfg.method.head_refit:  # the site reads the run config itself: asked or not
        raise RemdrError(
            "the coordinator asked for head statistics", "the run config has head-refit off", ""
        )
    device = resolve_device(cfg.train.device)
    model = _received_model(cfg, global_state, local_state, device)
    if not refittable(model):
        raise RemdrError(
            "the coordinator asked for head statistics",
            f"{cfg.train.method} mixes its heads (a gate or one shared head)",
            "",
        )
    splits = {"train": site.train, "val": site.val}
    sums = split_sums(model, splits, cfg.train.batch_size * 2, device)
    return to_arrays({name: withheld(s) for name, s in sums.items()})
