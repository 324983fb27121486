"""The federation's settings: the flat Flower run config split into the core config and FedConfig.

A run config is one flat table (kebab-case keys): every core key of `ExperimentConfig` plus the
keys of `FedConfig`. The app bundle's `[tool.flwr.app.config]` is `run_config_defaults()`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any

from remdr import __version__
from remdr.config import ExperimentConfig, apply_overrides, flat_keys, flat_values
from remdr.errors import ConfigError, Problems
from remdr.method_config import LDS_AUTO, SITE_LDS_REWEIGHT
from remdr.presets import PRESETS, apply_preset
from remdr.registry import get_spec
from remdr.settings import (
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    SHARE,
    check_fields,
    coerce,
    describe_fields,
    setting,
    unknown_key,
)

# Where federated training's defaults differ from centralized training's (docs/federation.md has
# the measurements): the method is Re-M3Dr; AdamW at lr 0.001 (plain SGD, with or without
# SCAFFOLD, stayed at the label variance on the suite); small batches; GroupNorm instead of
# BatchNorm (running statistics averaged across label-skewed sites misfit the averaged weights);
# a constant learning rate (the rounds are still far from converged when a decay would start).
# With FedConfig's auto local-steps every site takes the same few steps per round, so a big site
# cannot pull the model to its labels while a small one takes four; and each site weights its
# rare MD values up by its own label density (`lds-reweight` auto). A run config that sets any
# of these keys wins; a private method keeps DP-SGD's recipe (docs/privacy.md).
# The OCT view is fixed for a federation: the server builds the model before any site's data
# is seen, so "auto" cannot be resolved there.
FEDERATED_DEFAULTS = {
    "method": "remdr",
    "batch-size": 8,
    "optimizer": "adamw",
    "lr": 0.001,
    "group-norm": True,
    "schedule": "constant",
    "oct-view": "bscans",
    "lds-reweight": LDS_AUTO,  # each site re-weights by its own label density (auto: 0.25)
    "head-blend": True,  # the final model blends in a unimodal head where validation says so
    "head-refit": True,  # each head's output layer refitted from the sites' summed Grams
}

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
DRIFT_CONTROLS = ("auto", "off", "scaffold")
MEAN_STRATEGIES = ("fedavg", "fedprox", "fedadam")  # SCAFFOLD's c is a mean over the sites
AUTO_LOCAL_STEPS = 5  # docs/federation.md, "Skewed mixes": chosen on the suite
AUTO_WARMUP_SHARE = 0.25  # of the rounds, the sites' lr warm-up (8 of 32): chosen on the suite
SITE_DP = ("off", "fixed", "adaptive")
ON_MISSING = ("continue", "abort")


@dataclass
class FedConfig:
    """Federation settings; run-config keys are the kebab-case field names."""

    preset: str = setting(
        "cpu",
        "a named set of training values for the sites' machines (remdr-train --help lists them)",
        choices=tuple(PRESETS),
    )
    num_server_rounds: int = setting(32, "federated rounds", low=1)
    local_epochs: int = setting(1, "epochs each site trains per round", low=1)
    local_steps: int = setting(
        -1,
        "> 0: every site takes exactly this many optimiser steps per round, whatever its size "
        "(instead of local-epochs), so a 30-eye and a 600-eye site do comparable work; 0: "
        f"local-epochs; -1 (auto): {AUTO_LOCAL_STEPS}, or local-epochs where it is above 1 or "
        "the federation is private (DP-SGD accounts in epochs)",
        low=-1,
    )
    strategy: str = setting("fedavg", "how the coordinator aggregates", choices=STRATEGIES)
    proximal_mu: float = setting(0.01, "FedProx proximal term", **NON_NEGATIVE)
    drift_control: str = setting(
        "off",
        "scaffold: every site step is corrected by the federation's mean gradient minus the "
        "site's own (SCAFFOLD control variates; c_i stays at the site, its change is sent); "
        "auto: scaffold with local-steps, plain SGD and a mean-based strategy, unless private "
        "(with AdamW the correction stopped learning on the suite); else off",
        choices=DRIFT_CONTROLS,
    )
    server_lr: float = setting(0.05, "FedAdam server learning rate (eta)", **POSITIVE)
    server_beta_1: float = setting(0.9, "FedAdam first-moment decay", **FRACTION)
    server_beta_2: float = setting(0.99, "FedAdam second-moment decay", **FRACTION)
    server_tau: float = setting(1e-3, "FedAdam adaptivity (epsilon)", **POSITIVE)
    trim_beta: float = setting(
        0.2, "FedTrimmedAvg: fraction cut at each end", low=0, high=0.5, high_open=True
    )
    fraction_train: float = setting(1.0, "fraction of connected sites asked to train", **SHARE)
    min_nodes: int = setting(2, "the expected sites: every round waits for all of them", low=1)
    round_timeout: float = setting(900.0, "seconds to wait for replies in one round", **POSITIVE)
    fedbn: bool = setting(False, "keep normalisation layers local to each site")
    keep_site_optimizer: bool = setting(True, "a site resumes its AdamW moments between rounds")
    # one message per round: a site validates the model it receives inside its train reply
    # (round r's reply scores round r-1's model) and the final model gets one evaluate message;
    # true sends a separate evaluate message every round, as Flower's examples do
    separate_evaluate: bool = setting(False, "an evaluate message every round, not one at the end")
    on_missing: str = setting(
        "continue", "a site does not reply or connect in time", choices=ON_MISSING
    )
    node_wait: float = setting(
        120.0, "seconds a round waits for min-nodes sites to connect", **NON_NEGATIVE
    )
    max_update_norm: float = setting(
        1e4, "reject a larger site update (0: no limit)", **NON_NEGATIVE
    )
    share_metrics: str = setting(
        "auto",
        "the metrics each site is asked to share: auto (each site's own remdr-client "
        "--share-metrics), minimal, standard or full; a site that shares less declines the run",
        choices=("auto", "minimal", "standard", "full"),
    )
    local_validation: bool = setting(
        False,
        "a site also scores its model after local training on its validation patients (val-* "
        "in the train reply, beside received-*): a drift diagnostic, one more pass per round",
    )
    max_site_examples: int = setting(
        100_000,
        "the most training (or validation) eyes one site may claim; a larger count is refused, "
        "as is one above twice the site's first",
        low=1,
    )
    site_dp: str = setting("off", "site-level DP of the aggregate (clipping)", choices=SITE_DP)
    site_dp_noise: float = setting(1.0, "z: noise std is z * C / number of sites", **POSITIVE)
    site_dp_clip: float = setting(
        1.0, "C (fixed) or the initial C (adaptive) per site update", **POSITIVE
    )
    site_dp_delta: float = setting(1e-5, "delta of the site-level guarantee", **PROBABILITY)
    average_rounds: int = setting(
        4,
        "with head-refit: the mean of the last N rounds' global models is refitted too, and the "
        "final model is whichever of it and the best round scores lower on the sites' "
        "validation sums (0 or 1: the best round only)",
        low=0,
    )
    warmup_rounds: int = setting(
        -1,
        "the sites' learning rate rises linearly over the first N rounds (round r trains at "
        "r/N of lr, then lr): the first rounds' steps from a random model are the ones that "
        "drift apart most; 0: lr from round 1; -1 (auto): a quarter of num-server-rounds with "
        "local steps, 0 with local epochs or a private federation (measured without them)",
        low=-1,
    )
    unimodal_rounds: int = setting(
        0,
        "the first N rounds train each image's branch with its own head's loss only (no fused "
        "loss; Harmony's unimodal stage), so a branch that few sites can train learns before "
        "fusion leans on the other; 0: every round trains the method's whole objective",
        low=0,
    )
    out_dir: str = setting(
        "runs/federation",
        "the coordinator's run directory",
        pattern=r".*\S.*",
        text="a non-empty path",
    )
    sim_data_root: str = setting("", "simulation only: virtual node k reads <root>/site-<k>")


def fed_keys() -> dict[str, str]:
    return {f.name.replace("_", "-"): f.name for f in fields(FedConfig)}


def describe_fed_keys(fed: FedConfig | None = None) -> list[str]:
    """The `--list-keys` lines of the federation keys."""
    return describe_fields("federation", fed or FedConfig())


def split_run_config(
    run_config: dict[str, Any], *, check_cohort: bool = True
) -> tuple[ExperimentConfig, FedConfig]:
    """Flat Flower run config -> (core config, federation config); every problem (unknown key,
    type, range, combination) is raised at once. `check_cohort=False` skips the check that
    needs the real number of sites (a simulator learns it from the data)."""
    p = Problems()
    fed_names, core_names = fed_keys(), flat_keys()
    fed = FedConfig()
    core: dict[str, Any] = {}
    for key, value in run_config.items():
        k = key.replace("_", "-")
        if k in fed_names:
            name = fed_names[k]
            try:
                setattr(fed, name, coerce(value, getattr(fed, name), k))
            except ConfigError as err:
                p.items.extend(err.items)
        elif k in core_names:
            core[k] = value
        else:
            p.add(*unknown_key(key, [*core_names, *fed_names]))
    base = apply_overrides(ExperimentConfig(), FEDERATED_DEFAULTS)  # fixes suggest its values
    if fed.preset in PRESETS:  # an unknown name is reported with the other keys below
        base = apply_preset(base, fed.preset)
    cfg = p.call(apply_overrides, base, core)
    bad = check_fields(fed, p)
    if cfg is not None and cfg.data.oct_view == "auto":
        p.add(
            "oct-view='auto' in a federation",
            "the server builds the model before any site's data is seen",
            "set oct-view='bscans' (3-D OCT volumes) or 'rnflt' (2-D thickness maps)",
        )
    if not bad:  # every key arrives (flwr run merges pyproject's table), so no "was it given"
        cfg = _resolve_auto(fed, cfg)
    if fed.site_dp != "off" and not bad:
        _check_site_dp(fed, cfg, p, check_cohort)
    if fed.drift_control != "off" and not bad:
        if fed.site_dp != "off" or (cfg is not None and get_spec(cfg.train.method).private):
            p.add(
                f"drift-control={fed.drift_control} with differential privacy",
                "a site's control variate is its mean gradient, released outside the DP accounting",
                "drift-control=off with site-dp or a private method",
            )
        if fed.strategy not in MEAN_STRATEGIES:
            p.add(
                f"drift-control={fed.drift_control} with strategy={fed.strategy}",
                "the control variates are a mean over the sites; a robust rule's aggregate is not",
                "use fedavg, fedprox or fedadam",
            )
    if fed.unimodal_rounds and not bad:
        _check_unimodal_rounds(fed, cfg, p)
    if fed.warmup_rounds > fed.num_server_rounds:
        p.add(
            f"warmup-rounds={fed.warmup_rounds} with num-server-rounds={fed.num_server_rounds}",
            "the sites' learning rate would never reach lr",
            "set warmup-rounds to num-server-rounds or fewer",
        )
    p.raise_if_any(ConfigError)
    assert cfg is not None  # no problem means apply_overrides returned
    return cfg, fed


def _check_unimodal_rounds(fed: FedConfig, cfg: ExperimentConfig | None, p: Problems) -> None:
    if fed.unimodal_rounds >= fed.num_server_rounds:
        p.add(
            f"unimodal-rounds={fed.unimodal_rounds} with num-server-rounds={fed.num_server_rounds}",
            "no round would train the fused prediction",
            "set unimodal-rounds below num-server-rounds",
        )
    spec = get_spec(cfg.train.method) if cfg is not None else None
    one_loss = spec is not None and spec.update in ("plain", "sagm") and not spec.private
    if spec is not None and not (spec.unimodal_loss and spec.fusion == "mlp" and one_loss):
        p.add(
            f"unimodal-rounds with method={spec.name}",
            "it needs unimodal heads that train the encoders, a fused loss to leave out and an "
            "update rule of one loss, without DP-SGD (whose noise would move the fusion head)",
            "use remdr, remdr_no_con, remdr_no_sagm or multitask",
        )


def _resolve_auto(fed: FedConfig, cfg: ExperimentConfig | None) -> ExperimentConfig | None:
    """The federated recipe (docs/federation.md, "Skewed mixes"): a few fixed local steps per
    round, so a big site cannot pull the model towards its own labels for a whole epoch while a
    small one takes four steps; epochs where the user asked for them or where DP-SGD's
    accounting needs them (`local-steps = 0`); with local steps the sites' lr warms up over the
    first quarter of the rounds. `lds-reweight = auto` becomes 0.25, so each site
    weights its rare MD values up by its own label density, except for a private method, which
    reads no statistic of its labels, and under site-level DP (measured without it)."""
    private = fed.site_dp != "off" or (cfg is not None and get_spec(cfg.train.method).private)
    if fed.local_steps < 0:
        epochs = private or fed.local_epochs > 1  # 1 is the default: it says nothing
        fed.local_steps = 0 if epochs else AUTO_LOCAL_STEPS
    if fed.warmup_rounds < 0:
        warm = fed.local_steps > 0 and not private
        fed.warmup_rounds = int(AUTO_WARMUP_SHARE * fed.num_server_rounds) if warm else 0
    if fed.drift_control == "auto":
        sgd = cfg is not None and cfg.train.optimizer == "sgd"
        use = fed.local_steps > 0 and sgd and not private and fed.strategy in MEAN_STRATEGIES
        fed.drift_control = "scaffold" if use else "off"
    if (
        cfg is not None
        and cfg.method.head_refit
        and (private or fed.strategy not in MEAN_STRATEGIES)
    ):
        # the sites' Grams are released outside any DP accounting, and summed, not screened
        # robustly: off where the run trusts its sites less
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, head_refit=False))
    if cfg is not None and cfg.method.lds_reweight == LDS_AUTO:
        power = 0.0 if private else SITE_LDS_REWEIGHT
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, lds_reweight=power))
    return cfg


def _check_site_dp(
    fed: FedConfig, cfg: ExperimentConfig | None, p: Problems, check_cohort: bool
) -> None:
    if fed.strategy not in ("fedavg", "fedprox"):
        p.add(
            f"site-dp with strategy={fed.strategy}",
            "the site-level accounting assumes a plain mean of clipped updates",
            "use strategy=fedavg or fedprox",
        )
    if cfg is not None and not (cfg.privacy.group_norm or get_spec(cfg.train.method).private):
        p.add(
            "site-dp without group-norm=true",
            "noise is added to every array, and BatchNorm's integer counters cannot take it",
            "set group-norm=true (or use a private method)",
        )
    if check_cohort and fed.site_dp == "adaptive" and fed.site_dp_noise >= fed.min_nodes / 10:
        p.add(
            f"site-dp=adaptive with site-dp-noise={fed.site_dp_noise:g} and "
            f"min-nodes={fed.min_nodes}",
            "Flower's adaptive clipping gives the count of clipped updates noise of std "
            f"min-nodes/20, which needs site-dp-noise below min-nodes/10 = {fed.min_nodes / 10:g}",
            "use site-dp=fixed, or a smaller site-dp-noise",
        )


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
        if key == "warmup-rounds" and done >= max(old[key], new[key]):
            continue  # auto follows num-server-rounds; every round still to come trains at lr
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
