"""What one site does in a federated round, without Flower: load its data, train, evaluate.

The Flower ClientApp (`remdr.client`) only translates messages to and from these calls, so the
same code runs under the simulator, in deployment and in unit tests.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from remdr import __version__
from remdr.config import ExperimentConfig, apply_overrides, coerce, flat_values
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.data.loading import Dataset
from remdr.data.splits import split_records
from remdr.errors import ConfigError
from remdr.methods import create_method, get_spec
from remdr.metrics import BINS, regression_metrics
from remdr.runtime import prepare_model, resolve_device, seed_everything
from remdr.train import evaluate, fit, make_loader

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
SITE_DP = ("off", "fixed", "adaptive")
ON_MISSING = ("continue", "abort")


@dataclass
class FedConfig:
    """Federation settings; run-config keys are the kebab-case field names."""

    num_server_rounds: int = 3
    local_epochs: int = 1
    strategy: str = "fedavg"  # one of STRATEGIES
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.05  # FedAdam eta
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1e-3
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each end
    fraction_train: float = 1.0
    min_nodes: int = 2  # the expected number of sites: every round waits for all of them
    round_timeout: float = 900.0  # seconds to wait for replies in one round
    fedbn: bool = False  # keep normalisation layers local to each site
    on_missing: str = "continue"  # a site does not reply or connect in time: continue or abort
    node_wait: float = 120.0  # seconds a round waits for all min-nodes sites to be connected
    max_update_norm: float = 1e4  # reject a site update whose change is larger (0: no limit)
    site_dp: str = "off"  # site-level DP of the aggregate: off, fixed or adaptive clipping
    site_dp_noise: float = 1.0  # z: noise std is z * C / number of sites
    site_dp_clip: float = 1.0  # C (fixed) or the initial C (adaptive) of each site's update
    site_dp_delta: float = 1e-5  # delta of the site-level guarantee
    out_dir: str = "runs/federation"  # coordinator's run directory (checkpoints, report)
    sim_data_root: str = ""  # simulation only: virtual node k reads <root>/site-<k>


def fed_keys() -> dict[str, str]:
    return {f.name.replace("_", "-"): f.name for f in fields(FedConfig)}


def split_run_config(run_config: dict[str, Any]) -> tuple[ExperimentConfig, FedConfig]:
    """Flat Flower run config -> (core config, federation config); unknown keys are errors."""
    fed_names = fed_keys()
    fed_values: dict[str, Any] = {}
    core: dict[str, Any] = {}
    for key, value in run_config.items():
        k = key.replace("_", "-")
        if k in fed_names:
            fed_values[fed_names[k]] = value
        else:
            core[k] = value
    cfg = apply_overrides(ExperimentConfig(), core)
    fed = FedConfig()
    for name, value in fed_values.items():
        setattr(fed, name, coerce(value, getattr(fed, name), name.replace("_", "-")))
    if fed.strategy not in STRATEGIES:
        raise ConfigError(f"strategy={fed.strategy!r}", f"must be one of {', '.join(STRATEGIES)}")
    if fed.num_server_rounds < 1 or fed.local_epochs < 1 or fed.min_nodes < 1:
        raise ConfigError("num-server-rounds/local-epochs/min-nodes", "must be at least 1")
    if fed.on_missing not in ON_MISSING:
        raise ConfigError(f"on-missing={fed.on_missing!r}", "must be continue or abort")
    if fed.site_dp not in SITE_DP:
        raise ConfigError(f"site-dp={fed.site_dp!r}", f"must be one of {', '.join(SITE_DP)}")
    if fed.site_dp != "off":
        if fed.strategy not in ("fedavg", "fedprox"):
            raise ConfigError(
                f"site-dp with strategy={fed.strategy}",
                "the site-level accounting assumes a plain mean of clipped updates",
                "use strategy=fedavg or fedprox",
            )
        if not (cfg.privacy.group_norm or get_spec(cfg.train.method).private):
            raise ConfigError(
                "site-dp without group-norm=true",
                "noise is added to every array, and BatchNorm's integer counters cannot take it",
                "set group-norm=true (or use a private method)",
            )
        if fed.site_dp_noise <= 0 or fed.site_dp_clip <= 0 or not 0 < fed.site_dp_delta < 1:
            raise ConfigError("site-dp-noise/clip/delta", "noise and clip > 0, delta in (0, 1)")
    return cfg, fed


def run_config_defaults() -> dict[str, Any]:
    """Every run-config key with its default: the `[tool.flwr.app.config]` table."""
    out = flat_values(ExperimentConfig())
    for key, name in fed_keys().items():
        out[key] = getattr(FedConfig(), name)
    return out


def versions_compatible(server: str, client: str = __version__) -> bool:
    """Same major.minor: the config schema and state-dict layout only change between those."""
    return server.split(".")[:2] == client.split(".")[:2]


# -- a site's data -----------------------------------------------------------------------------


@dataclass
class SiteData:
    dataset: Dataset
    train: EyeDataset
    val: EyeDataset

    def histogram(self) -> dict[str, int]:
        from remdr.metrics import severity_bins

        bins = severity_bins(np.array([r.md for r in self.dataset.records]))
        return {name: int((bins == i).sum()) for i, name in enumerate(BINS)}


def load_site(data_path: str | Path, cfg: ExperimentConfig, seed: int = 0) -> SiteData:
    """The site's records split by patient into local train and validation sets."""
    ds = load_dataset(data_path, cfg.data, quiet=True)
    if ds.has_splits:
        parts = split_records(ds.records, 0, 0, seed)
        train, val = parts["train"], parts["val"] + parts["test"]
    else:
        parts = split_records(ds.records, cfg.data.val_fraction, 0.0, seed)
        train, val = parts["train"], parts["val"]
    return SiteData(ds, EyeDataset(train, cfg.data), EyeDataset(val, cfg.data))


# -- one round at a site ----------------------------------------------------------------------

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def norm_state_keys(model: nn.Module) -> list[str]:
    """State-dict keys of normalisation layers (parameters and running statistics): FedBN's local part."""
    keys = []
    for prefix, module in model.named_modules():
        if isinstance(module, NORM_TYPES):
            keys += [f"{prefix}.{k}" if prefix else k for k in module.state_dict()]
    return keys


@dataclass
class RoundResult:
    state: dict[str, torch.Tensor]
    metrics: dict[str, float]
    method_state: dict
    local_state: dict[str, torch.Tensor] = field(default_factory=dict)


def _metrics_record(prefix: str, m: dict[str, float]) -> dict[str, float]:
    keys = ["mse", "mae", "mae_bin_avg"] + [f"mae_{b}" for b in BINS]
    return {f"{prefix}-{k.replace('_', '-')}": float(m.get(k, float("nan"))) for k in keys}


def train_round(
    cfg: ExperimentConfig,
    fed: FedConfig,
    global_state: dict[str, torch.Tensor],
    site: SiteData,
    *,
    server_round: int = 1,
    method_state: dict | None = None,
    local_state: dict[str, torch.Tensor] | None = None,
    ledger_label: dict | None = None,
) -> RoundResult:
    """Train the global model on this site for `fed.local_epochs`; return weights and metrics.

    A private method trains under the site's `cfg.privacy` (ledger, ceiling) and reports the
    site's cumulative epsilon; a round that would break the ceiling raises PrivacyError first.
    """
    device = resolve_device(cfg.train.device)
    seed = cfg.train.seed + 1000 * server_round
    seed_everything(seed, device)
    train_cfg = dataclasses.replace(cfg.train, seed=seed, schedule="constant")
    method = create_method(cfg.train.method, cfg.method)
    method.setup(site.train.targets(), seed=seed)
    if method_state:
        method.scores.load_state_dict(method_state["scores"])
    model = method.build_model(cfg.model, cfg.data, group_norm=cfg.privacy.group_norm)
    model.load_state_dict(global_state)
    if fed.fedbn and local_state:
        model.load_state_dict(local_state, strict=False)
    model = prepare_model(model, device)
    anchor = {k: v.detach().clone().to(device) for k, v in model.named_parameters()}
    mu = fed.proximal_mu if fed.strategy == "fedprox" else 0.0
    start = time.perf_counter()
    result = fit(
        model,
        method,
        site.train,
        train_cfg,
        device,
        epochs=fed.local_epochs,
        augment=cfg.data.augment,
        keep_best=False,
        progress=False,
        proximal=(mu, anchor) if mu > 0 else None,
        privacy=cfg.privacy,
        planned_rounds=fed.num_server_rounds,
        ledger_label={"round": server_round, **(ledger_label or {})},
    )
    seconds = time.perf_counter() - start
    metrics = {
        "num-examples": len(site.train),
        "unit-weight": 1.0,  # equal weights: site-level DP's sensitivity assumes them
        "skipped-records": site.dataset.report.n_bad,  # corrupt or invalid files, not used
        "train-loss": float(result.history[-1].get("train_loss", float("nan"))),
        "train-seconds": seconds,
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
    metrics.update(evaluate_site(model, site, cfg, device))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    local = {k: state[k] for k in norm_state_keys(model)} if fed.fedbn else {}
    return RoundResult(state, metrics, method.state_dict(), local)


def evaluate_site(model, site: SiteData, cfg: ExperimentConfig, device) -> dict[str, float]:
    """Validation metrics of the site's held-out patients (`val-*` keys, plus `num-val`)."""
    loader = make_loader(site.val, cfg.train.batch_size * 2, shuffle=False, seed=0, device=device)
    m = (
        evaluate(model, loader, device)
        if len(site.val)
        else regression_metrics(np.zeros(0), np.zeros(0))
    )
    return {"num-val": len(site.val), **_metrics_record("val", m)}


def evaluate_global(
    cfg: ExperimentConfig,
    global_state: dict[str, torch.Tensor],
    site: SiteData,
    local_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    device = resolve_device(cfg.train.device)
    method = create_method(cfg.train.method, cfg.method)
    model = method.build_model(cfg.model, cfg.data, group_norm=cfg.privacy.group_norm)
    model.load_state_dict(global_state)
    if local_state:
        model.load_state_dict(local_state, strict=False)
    return evaluate_site(prepare_model(model, device), site, cfg, device)
