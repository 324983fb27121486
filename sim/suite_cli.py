"""remdr-sim suite: federated against centralized training over the suite of partitions.

    remdr-sim suite                                    # every case at seeds 0 and 1
    remdr-sim suite --cases screening-5,dirichlet-a0.3-5 --seeds 0,1,2
    remdr-sim suite --reference concat                 # also federate naive fusion
    remdr-sim suite --fed strategy=fedprox --fed proximal-mu=0.1 --set lr=0.002
    remdr-sim suite --synthetic-n 4800                 # 4x the eyes: less noisy ratios
    remdr-sim suite --list-cases

Prints one line per run and, at the end, the table with the median and worst ratio of
federated to centralized validation and test MSE; `<out>/suite.md` and `suite.json` keep them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from remdr.sim.runner import check_site_resources
from remdr.sim.suite import CASES, SUITE, SuiteRun, run_suite
from remdr.sim.suite_rows import table

from remdr.cli.common import Parser, add_config_flags, check_output_dir, config_from_args
from remdr.config import ExperimentConfig, apply_overrides, flat_values
from remdr.data.synthetic import SyntheticSpec
from remdr.errors import Problems


def build_parser() -> argparse.ArgumentParser:
    from remdr.sim.cli import SIM_DEFAULTS

    ap = Parser(
        prog="remdr-sim suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--list-cases", action="store_true", help="print the cases and exit")
    ap.add_argument("--seeds", default="0,1", help="comma-separated seeds (partition + training)")
    ap.add_argument("--data", default="", help="dataset folder (default: the synthetic set)")
    ap.add_argument(
        "--synthetic-n",
        type=int,
        default=None,
        help=f"eyes in the synthetic set (default {SyntheticSpec.n}, the least): more gives every "
        "case larger validation and test sets; the training budget (rounds x local steps) "
        "stays, so raise --rounds with it to keep how often each eye is seen",
    )
    ap.add_argument(
        "--out",
        default="runs/suite",
        help="the suite's folder (kept, not replaced; suite.json keeps an earlier call's runs of "
        "the same settings)",
    )
    ap.add_argument("--rounds", type=int, default=32)
    ap.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="train epochs per round instead of the auto local steps (default: local steps)",
    )
    ap.add_argument("--strategy", default="fedavg")
    ap.add_argument(
        "--fed", action="append", default=[], metavar="KEY=VALUE", help="any federation key"
    )
    ap.add_argument(
        "--reference", default="", help="a method federated too on every case, e.g. concat"
    )
    ap.add_argument(
        "--cpus-per-site", type=float, default=1, help="whole CPU cores per virtual site"
    )
    ap.add_argument("--progress", action="store_true", help="show every round and epoch")
    ap.add_argument(
        "--central-cache",
        default="",
        help="folder of centralized arms trained before (default: <out>/central); shared by "
        "suites that differ only in the federation's settings",
    )
    ap.add_argument(
        "--central-epochs",
        type=int,
        default=0,
        help="train the centralized arm this many epochs (default: the federation's work, "
        "rounds x local steps x sites batches); a fixed budget lets federations of different "
        "lengths share one arm",
    )
    add_config_flags(ap, defaults=SIM_DEFAULTS, federation=True)
    return ap


def suite_of(args: argparse.Namespace) -> SuiteRun:
    """The suite the flags describe; every problem with them at once, before any training."""
    from remdr.sim.cli import SIM_DEFAULTS, fed_overrides

    from remdr.cli.common import check_flag
    from remdr.federation.run_config import split_run_config
    from remdr.registry import list_methods

    p = Problems()
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        p.add(f"--cases {args.cases}", f"unknown {', '.join(unknown)}", "see --list-cases")
    seeds: list[int] = []
    for s in args.seeds.split(","):
        if s.strip().isdigit():
            seeds.append(int(s))
        else:
            p.add(f"--seeds {args.seeds}", f"{s!r} is not a seed", "e.g. --seeds 0,1,2")
    check_flag(p, "--rounds", args.rounds, 32, low=1)
    # fewer eyes than the default leave the 8-site cases' sites too small to split
    check_flag(p, "--synthetic-n", args.synthetic_n, 4 * SyntheticSpec.n, low=SyntheticSpec.n)
    if args.data and args.synthetic_n is not None:
        p.add(f"--synthetic-n {args.synthetic_n}", "sizes the synthetic set", "drop --data or it")
    if args.local_epochs is not None:
        check_flag(p, "--local-epochs", args.local_epochs, 1, low=1)
    check_flag(p, "--central-epochs", args.central_epochs, 0, low=0)
    check_site_resources(p, args.cpus_per_site)
    check_output_dir(p, "--out", args.out)
    if args.reference and args.reference not in list_methods(private=False):
        p.add(f"--reference {args.reference}", "not a non-private method", "e.g. concat")
    fed = fed_overrides(args.fed, p)
    if args.local_epochs is not None:
        fed.setdefault("local-steps", "0")  # epochs asked for: not the auto local steps
    cfg = p.call(config_from_args, args, apply_overrides(ExperimentConfig(), SIM_DEFAULTS))
    if cfg is not None:
        run_config = {
            **flat_values(cfg),
            "strategy": args.strategy,
            "num-server-rounds": max(1, args.rounds),
            "local-epochs": max(1, args.local_epochs or 1),
            **fed,
        }
        p.call(split_run_config, run_config, check_cohort=False)
    p.raise_if_any()
    assert cfg is not None
    return SuiteRun(
        cfg,
        out=Path(args.out),
        cases=tuple(CASES[n] for n in names) if names else SUITE,
        seeds=tuple(seeds),
        data=args.data,
        synthetic_n=args.synthetic_n or SyntheticSpec.n,
        rounds=args.rounds,
        local_epochs=args.local_epochs or 1,
        strategy=args.strategy,
        fed=fed,
        reference=args.reference,
        cpus_per_site=int(args.cpus_per_site),
        progress=args.progress,
        central_cache=Path(args.central_cache) if args.central_cache else None,
        central_epochs=max(0, args.central_epochs),
    )


def suite(args: argparse.Namespace) -> int:
    if args.list_cases:
        for case in SUITE:
            print(f"{case.name:18s} {case.about}")
        return 0
    run = suite_of(args)
    print(
        f"suite: {len(run.cases)} cases x {len(run.seeds)} seeds, {run.cfg.train.method}, "
        f"{run.rounds} rounds, {run.strategy}"
        + (f", {run.fed}" if run.fed else "")
        + (f"; reference {run.reference}" if run.reference else ""),
        flush=True,
    )
    result = run_suite(run, say=lambda line: print(line, flush=True))
    print()
    print(table(result["rows"], result["summary"]))
    print(f"\nwrote {run.out / 'suite.md'} and suite.json")
    return 0
