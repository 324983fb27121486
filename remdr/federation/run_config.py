"""The federation's settings: the flat Flower run config split into the core config and FedConfig.

A run config is one flat table (kebab-case keys): every core key of `ExperimentConfig` plus the
keys of `FedConfig`. The app bundle's `[tool.flwr.app.config]` is `run_config_defaults()`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from remdr import __version__
from remdr.config import ExperimentConfig, apply_overrides, coerce, flat_values
from remdr.errors import ConfigError
from remdr.methods import get_spec

# Where federated training's defaults differ from centralized training's (README, "Federated
# vs centralized", has the sweep): sites take 4x more, smaller steps per pass over their data
# (FedAvg averages parallel updates, so a round advances only as far as one site's steps go),
# GroupNorm instead of BatchNorm (running statistics averaged across label-skewed sites misfit
# the averaged weights), and a constant learning rate (the rounds are still far from converged
# when a decay would start). A run config that sets any of these keys wins.
# The OCT view is fixed for a federation: the server builds the model before any site's data
# is seen, so "auto" cannot be resolved there.
FEDERATED_DEFAULTS = {
    "batch-size": 8,
    "group-norm": True,
    "schedule": "constant",
    "oct-view": "bscans",
}

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
    keep_site_optimizer: bool = True  # a site resumes its AdamW moments from its last round
    # one message per round: a site validates the model it receives inside its train reply
    # (round r's reply scores round r-1's model) and the final model gets one evaluate message;
    # true sends a separate evaluate message every round, as Flower's examples do
    separate_evaluate: bool = False
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
    cfg = apply_overrides(ExperimentConfig(), {**FEDERATED_DEFAULTS, **core})
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
        if fed.site_dp == "adaptive" and fed.site_dp_noise >= fed.min_nodes / 10:
            raise ConfigError(
                f"site-dp=adaptive with site-dp-noise={fed.site_dp_noise:g} and "
                f"min-nodes={fed.min_nodes}",
                "Flower's adaptive clipping gives the count of clipped updates noise of std "
                f"min-nodes/20, which needs site-dp-noise below min-nodes/10 = {fed.min_nodes / 10:g}",
                "use site-dp=fixed, or a smaller site-dp-noise",
            )
    return cfg, fed


# Keys a resumed run may change: how the coordinator waits and where things run, not what is
# trained. `num-server-rounds` may also change, but not below the rounds already done. Every other
# key (method, data, optimiser, strategy, privacy, cohort) must equal the saved run's.
RESUMABLE = ("round-timeout", "node-wait", "on-missing", "device", "num-workers", "out-dir")


def _normalised(run_config: dict[str, Any]) -> dict[str, Any]:
    cfg, fed = split_run_config(run_config)
    return {**flat_values(cfg), **{key: getattr(fed, name) for key, name in fed_keys().items()}}


def resume_changes(saved: dict[str, Any], current: dict[str, Any], done: int) -> list[str]:
    """The training keys that differ between a saved run's config and this one, as
    'key saved -> now'; empty when the run may resume after round `done`."""
    old, new = _normalised(saved), _normalised(current)
    changes = []
    for key in sorted(old):
        if key in RESUMABLE or old[key] == new[key]:
            continue
        if key == "num-server-rounds" and new[key] >= done:
            continue
        changes.append(f"{key} {old[key]!r} -> {new[key]!r}")
    return changes


def run_config_defaults() -> dict[str, Any]:
    """Every run-config key with its default: the `[tool.flwr.app.config]` table."""
    out = flat_values(apply_overrides(ExperimentConfig(), FEDERATED_DEFAULTS))
    for key, name in fed_keys().items():
        out[key] = getattr(FedConfig(), name)
    return out


def versions_compatible(server: str, client: str = __version__) -> bool:
    """Same major.minor: the config schema and state-dict layout only change between those."""
    return server.split(".")[:2] == client.split(".")[:2]
