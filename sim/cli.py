"""remdr-sim: a whole multi-site federation on one machine, with Flower's simulation runtime.

Makes or loads the data, keeps a global test set apart, partitions the rest into hospital sites
(label skew by Dirichlet(alpha) over MD severity bins, quantity skew, or the dataset's own sites),
runs federated training with one virtual SuperNode per site, and writes a run directory with
report.json, report.md and plots. Optionally trains the same model centrally on the union of the
sites' data (--compare-centralized) and on each site alone (--compare-local).

This module is the command line only: flags, their checks and the DP recipe. The study itself is
`remdr.sim.simulation.run_simulation`, which another program can call with a `Simulation`.
`remdr-sim suite` runs the federation-quality suite (`remdr.sim.suite_cli`); `remdr-sim
suite-compare` compares two settings' suite runs (`remdr.sim.suite_compare`).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from remdr.sim.ray_cluster import add_cluster_flags, check_cluster_flags
from remdr.sim.runner import check_site_resources
from remdr.sim.simulation import Simulation, run_simulation

from remdr.cli.common import (
    Parser,
    add_config_flags,
    check_flag,
    check_output_dir,
    config_from_args,
    run_cli,
)
from remdr.config import ExperimentConfig, apply_overrides, flat_values
from remdr.data import SyntheticSpec
from remdr.errors import Problems
from remdr.federation.run_config import FEDERATED_DEFAULTS
from remdr.settings import PROBABILITY, Rule

# The federated training defaults (remdr.federation.run_config.FEDERATED_DEFAULTS) apply to both
# the federation and the centralized comparison, so the two differ only in where the data is.
SIM_DEFAULTS = dict(FEDERATED_DEFAULTS)

# The DP recipe of docs/privacy.md ("Measured utility and cost"): DP-SGD learns only with
# large batches (q ~ 0.5), more passes over the data and a constant learning rate; at the
# defaults above a private method predicts the mean. A private method gets it for every key the
# user does not set; batch-size is half the smallest site's training patients (q = 0.5 there).
DP_RECIPE = {
    "batch-size": "half the smallest site's training patients",
    "local-epochs": 4,
    "lr": 3e-3,
    "optimizer": "adamw",
    "schedule": "constant",
    "dp-target-epsilon": 8.0,  # sigma solved so the planned rounds end there (not if dp-noise is set)
}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="remdr-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", help="dataset folder (default: the embedded synthetic set)")
    ap.add_argument(
        "--synthetic-n", type=int, default=SyntheticSpec.n, help="eyes in the synthetic set"
    )
    ap.add_argument("--out", default="runs/sim", help="run directory (replaced if it exists)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument(
        "--partition",
        default="dirichlet",
        choices=["dirichlet", "iid", "quantity", "screening", "predefined"],
        help="dirichlet: label skew (--alpha); quantity: exponential site sizes; screening: one "
        "large, mostly normal screening clinic and small specialist clinics holding the severe "
        "eyes; predefined: the dataset's own site field",
    )
    ap.add_argument(
        "--alpha",
        type=float,
        default=1.0,
        help="Dirichlet concentration; smaller = more label skew",
    )
    ap.add_argument(
        "--test-fraction",
        type=float,
        default=0.2,
        help="patients kept apart as the global test set",
    )
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument(
        "--local-epochs", type=int, default=None, help="default 1; 4 with a private method"
    )
    ap.add_argument(
        "--strategy",
        default="fedavg",
        help="fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg, krum",
    )
    ap.add_argument(
        "--fedbn", action="store_true", help="keep normalisation layers local to each site"
    )
    ap.add_argument(
        "--cpus-per-site", type=float, default=1, help="whole CPU cores per virtual site"
    )
    ap.add_argument(
        "--gpus-per-site", type=float, default=0.0, help="GPU fraction per virtual site"
    )
    add_cluster_flags(ap)
    ap.add_argument(
        "--compare-centralized", action="store_true", help="also train on the union of site data"
    )
    ap.add_argument("--compare-local", action="store_true", help="also train each site alone")
    ap.add_argument(
        "--reference",
        default="",
        help="also federate this method on the same partition and settings, e.g. concat (naive "
        "late fusion, the baseline Re-M3Dr is measured against)",
    )
    ap.add_argument(
        "--site-modalities",
        default="",
        help="one entry per site: both, oct or fundus (the other image is withheld there), "
        "e.g. both,both,oct,fundus; default: both everywhere",
    )
    ap.add_argument(
        "--missing-rate",
        type=float,
        default=0.0,
        help="at 'both' sites, this fraction of eyes loses one image (a fair coin picks which)",
    )
    ap.add_argument(
        "--compare-complete-only",
        action="store_true",
        help="also run the federation of only the sites listed as 'both'",
    )
    ap.add_argument(
        "--fed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any federation key, e.g. --fed site-dp=fixed --fed on-missing=abort",
    )
    ap.add_argument("--quiet", action="store_true")
    add_config_flags(ap, defaults=SIM_DEFAULTS, federation=True)
    return ap


def explicit_keys(args: argparse.Namespace) -> set[str]:
    """The config and federation keys the user set on the command line."""
    from remdr.cli.common import COMMON_FLAGS

    keys = {k for k in COMMON_FLAGS if getattr(args, k.replace("-", "_"), None) is not None}
    keys |= {item.split("=", 1)[0].strip().replace("_", "-") for item in [*args.set, *args.fed]}
    if args.local_epochs is not None:
        keys.add("local-epochs")
    return keys


def check_sim_flags(args: argparse.Namespace) -> tuple[ExperimentConfig, int, dict]:
    """Every problem with the simulator's flags, its config keys (--set, ...) and federation
    keys (--fed), in one line, before any work starts; `resolve_config`'s result when none."""
    from remdr.federation.run_config import split_run_config

    p = Problems()
    check_flag(p, "--sites", args.sites, 4, low=1)
    check_flag(p, "--rounds", args.rounds, 32, low=1)
    check_flag(p, "--synthetic-n", args.synthetic_n, SyntheticSpec.n, low=8)
    check_flag(p, "--local-epochs", args.local_epochs, 1, low=1)
    alpha = Rule(
        "", low=0, low_open=True, fix="smaller is more label skew, e.g. 0.3; 1 is the default"
    )
    check_flag(p, "--alpha", args.alpha, rule=alpha)
    check_flag(p, "--test-fraction", args.test_fraction, 0.2, **PROBABILITY)
    check_site_resources(p, args.cpus_per_site, args.gpus_per_site)
    check_cluster_flags(p, args)
    check_output_dir(p, "--out", args.out)
    check_flag(p, "--missing-rate", args.missing_rate, 0.0, low=0, high=1, high_open=True)
    kinds = site_modalities(args)
    if kinds:
        from remdr.sim.partition import SITE_MODALITIES

        bad = sorted({k for k in kinds if k not in SITE_MODALITIES})
        if bad:
            p.add(f"--site-modalities {args.site_modalities}", f"unknown entries {', '.join(bad)}",
                  "each entry is both, oct or fundus")  # fmt: skip
        if len(kinds) != args.sites:
            p.add(f"--site-modalities {args.site_modalities}",
                  f"has {len(kinds)} entries for {args.sites} sites", "give one entry per site")  # fmt: skip
    if args.compare_complete_only and "both" not in (kinds or ["both"]):
        p.add("--compare-complete-only", "no site is listed as 'both'",
              "list at least one complete site in --site-modalities")  # fmt: skip
    if args.reference:
        from remdr.registry import list_methods

        if args.reference not in list_methods(private=False):
            p.add(f"--reference {args.reference}", "not a non-private method",
                  "e.g. --reference concat")  # fmt: skip
    if args.compare_complete_only and args.partition == "predefined":
        p.add("--compare-complete-only with --partition predefined", "not supported",
              "use dirichlet, iid or quantity")  # fmt: skip
    fed = fed_overrides(args.fed, p)
    resolved = p.call(resolve_config, args)
    # the run config as far as it is known before the data (the cohort comes from the
    # partition); flags refused above are left out of it, so nothing is said twice
    run_config: dict[str, Any] = {"strategy": args.strategy, "fedbn": args.fedbn}
    if resolved is not None:
        run_config.update(flat_values(resolved[0]))
        if resolved[1] >= 1:
            run_config["local-epochs"] = resolved[1]
    if args.rounds >= 1:
        run_config["num-server-rounds"] = args.rounds
    if args.sites >= 1:
        run_config["min-nodes"] = args.sites
    run_config.update(fed)  # --fed wins, as in `simulate`
    p.call(split_run_config, run_config, check_cohort=args.partition != "predefined")
    p.raise_if_any()
    assert resolved is not None
    return resolved


def site_modalities(args: argparse.Namespace) -> list[str]:
    """The --site-modalities entries ([] when not given)."""
    return [k.strip() for k in args.site_modalities.split(",")] if args.site_modalities else []


def resolve_config(args: argparse.Namespace) -> tuple[ExperimentConfig, int, dict]:
    """(core config, local epochs, the DP recipe keys used): a private method gets the
    DP recipe (docs/privacy.md) for every recipe key the user did not set."""
    from remdr.registry import get_spec

    cfg = config_from_args(args, apply_overrides(ExperimentConfig(), SIM_DEFAULTS))
    recipe: dict = {}
    if get_spec(cfg.train.method).private:
        explicit = explicit_keys(args)
        if "dp-noise" in explicit:  # the user chose sigma: no target to solve it for
            explicit.add("dp-target-epsilon")
        recipe = {k: v for k, v in DP_RECIPE.items() if k not in explicit}
        core = {k: v for k, v in recipe.items() if k not in ("batch-size", "local-epochs")}
        cfg = config_from_args(args, apply_overrides(ExperimentConfig(), {**SIM_DEFAULTS, **core}))
    epochs = args.local_epochs if args.local_epochs is not None else recipe.get("local-epochs", 1)
    return cfg, epochs, recipe


def dp_batch_size(site_patients: list[int], val_fraction: float) -> int:
    """Half the smallest site's training patients: Poisson rate q = 1/ceil(patients/batch) is
    0.5 at that site and at most 0.5 at the others."""
    train = max(2, round(min(site_patients) * (1 - val_fraction)))
    return math.ceil(train / 2)


def fed_overrides(items: list[str], problems: Problems | None = None) -> dict[str, str]:
    """The valid --fed KEY=VALUE items; every malformed item or unknown key is raised at once,
    or added to `problems`."""
    from remdr.config import flat_keys
    from remdr.federation.run_config import fed_keys
    from remdr.settings import unknown_key

    p, out = Problems() if problems is None else problems, {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or not key:
            p.add(f"--fed {item}", "expected KEY=VALUE", "e.g. --fed on-missing=abort")
        elif key in flat_keys():
            p.add(f"--fed {item}", "a config key, not a federation key", f"--set {item}")
        elif key not in fed_keys():
            _, why, fix = unknown_key(key, fed_keys())
            p.add(f"--fed {item}: unknown federation key", why, fix)
        else:
            out[key] = value.strip()
    if problems is None:
        p.raise_if_any()
    return out


def main(argv: list[str] | None = None) -> int:
    """`remdr-sim [flags]` simulates one study; `remdr-sim suite [flags]` runs the suite;
    `remdr-sim suite-compare` compares two settings' suites."""
    import signal

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["suite"]:
        from remdr.sim import suite_cli

        args = suite_cli.build_parser().parse_args(argv[1:])
        run = suite_cli.suite
    elif argv[:1] == ["suite-compare"]:
        from remdr.sim import suite_compare

        args = suite_compare.build_parser().parse_args(argv[1:])
        run = suite_compare.suite_compare
    else:
        args = build_parser().parse_args(argv)
        run = simulate

    def on_term(signum, frame):  # `kill` cleans up like Ctrl-C: the runner's finally stops Flower
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C / kill -INT clean up even when started as a background job (SIGINT inherited ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_cli("remdr-sim", lambda: run(args))


def simulation_of(args: argparse.Namespace) -> Simulation:
    """The study the flags describe; every flag and key checked first, all problems at once."""
    from remdr.sim.partition import PartitionSpec
    from remdr.sim.runner import SimResources

    cfg, local_epochs, recipe = check_sim_flags(args)
    if recipe:
        print(
            f"{cfg.train.method} is a private method: using the DP recipe (docs/privacy.md) for "
            "the keys not set on the command line: "
            + ", ".join(f"{k} {v}" for k, v in recipe.items())
            + "; without it DP-SGD learns nothing at these sizes",
            flush=True,
        )
    return Simulation(
        cfg,
        out=Path(args.out),
        partition=PartitionSpec(
            sites=args.sites,
            scheme=args.partition,
            alpha=args.alpha,
            test_fraction=args.test_fraction,
            seed=cfg.train.seed,
            site_modalities=tuple(site_modalities(args)),
            missing_rate=args.missing_rate,
        ),
        data=args.data or "",
        synthetic_n=args.synthetic_n,
        rounds=args.rounds,
        local_epochs=local_epochs,
        strategy=args.strategy,
        fedbn=args.fedbn,
        fed=_epochs_when_asked(args),
        resources=SimResources(
            int(args.cpus_per_site), args.gpus_per_site, args.ray_address, args.state_dir
        ),
        compare_centralized=args.compare_centralized,
        compare_local=args.compare_local,
        compare_complete_only=args.compare_complete_only,
        reference=args.reference,
        batch_from_patients=(
            (lambda patients: dp_batch_size(patients, cfg.data.val_fraction))
            if "batch-size" in recipe
            else None
        ),
        progress=not args.quiet,
    )


def _epochs_when_asked(args: argparse.Namespace) -> dict[str, str]:
    """The --fed keys; --local-epochs on the command line means epochs, not the auto local
    steps, unless --fed local-steps says otherwise."""
    fed = fed_overrides(args.fed)
    if args.local_epochs is not None and "local-steps" not in fed:
        fed["local-steps"] = "0"
    return fed


def simulate(args: argparse.Namespace) -> int:
    from remdr.sim.report import summary_table

    report = run_simulation(simulation_of(args))
    print()
    print(summary_table(report["results"], report.get("test_md", [])))
    print(f"\nwall time {report['wall_seconds']:.0f}s; report: {report['report_md']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
