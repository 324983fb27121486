"""remdr-bench: compare methods (accuracy over seeds) and measure training speed ratios."""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

from remdr.cli.common import (
    Parser,
    add_config_flags,
    check_flag,
    check_input_path,
    check_names,
    check_output_dir,
    check_output_file,
    check_regime,
    config_from_args,
    run_cli,
)
from remdr.config import ExperimentConfig, apply_overrides
from remdr.data import SyntheticSpec, synthetic_data
from remdr.errors import ConfigError, Problems
from remdr.registry import list_methods

# The bench measures remdr-train's own defaults (24 epochs): all 8 methods x 3 seeds on the
# 1,200-eye synthetic set take about 40 minutes on a 2-core CPU; --epochs 4 gives a quick look.
BENCH_DEFAULTS: dict[str, object] = {}
# concat first (the baseline of the ratios), then every multimodal method of the comparison
SPEED_METHODS = ("concat", "remdr", "sam", "ogm_ge", "multitask", "ume", "mmpareto", "masam",
                 "mla", "agm")  # fmt: skip


def _add_data_flags(ap: argparse.ArgumentParser) -> None:
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", help="dataset folder (default: the synthetic set)")
    src.add_argument("--synthetic", action="store_true", help="use the embedded synthetic dataset")
    ap.add_argument("--synthetic-n", type=int, default=SyntheticSpec.n)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(ap, skip=("method", "seed"), defaults=BENCH_DEFAULTS)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="remdr-bench", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("methods", help="train each method with several seeds on the same split")
    m.add_argument(
        "--methods",
        default="all",
        help="comma-separated names, 'all' (the non-private ones) or 'dp' (the DP-SGD ones)",
    )
    m.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    m.add_argument(
        "--curves",
        action="store_true",
        help="also score validation and test MSE after every epoch: curves.csv, "
        "learning_curves.png and where each method saturates (one run per method and seed at "
        "--epochs; with the cosine schedule a shorter budget would decay sooner, so use "
        "--set schedule=constant for budget-free curves)",
    )
    m.add_argument(
        "--vary",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="an ablation: run every method once per value of a config key (repeatable: every "
        "combination), e.g. --vary sam-every=1,4 --vary lds-reweight=0,0.5; rows are labelled "
        "'remdr [sam-every=4, ...]'",
    )
    m.add_argument("--out", default="runs/bench", help="folder for results.csv, results.md, plots")
    _add_data_flags(m)
    s = sub.add_parser(
        "speed", help="step time of each method as a ratio to the first (concat), interleaved"
    )
    s.add_argument(
        "--methods",
        default=",".join(SPEED_METHODS),
        help="comma-separated, or 'all'; the first one is the baseline",
    )
    s.add_argument("--steps", type=int, default=5, help="batches per timing round")
    s.add_argument("--rounds", type=int, default=5)
    s.add_argument("--out", default="", help="optional JSON file for the numbers")
    _add_data_flags(s)
    f = sub.add_parser(
        "federation",
        help="a loopback deployment (real SuperLink/SuperNodes): per-round time, on-site "
        "training time, their difference, bytes per round",
    )
    f.add_argument("--rounds", type=int, default=3)
    f.add_argument(
        "--sites",
        default="2",
        help="sites of the federation; several (2,4,8,16) give the cost curve: round time, "
        "coordinator CPU and memory, bytes per round as sites grow, in simulation and deployed "
        "up to --deploy-max sites",
    )
    f.add_argument(
        "--deploy-max",
        type=int,
        default=8,
        help="the cost curve deploys on loopback only up to this many sites (each site is a "
        "SuperNode and a worker of ~0.4 GB on this machine; 0: simulation only)",
    )
    f.add_argument("--eyes-per-site", type=int, default=32)
    f.add_argument(
        "--compare-separate-evaluate",
        action="store_true",
        help="also run with an evaluate message every round (Flower's usual two messages)",
    )
    f.add_argument("--out", default="", help="optional JSON file for the numbers")
    return ap


def _methods(arg: str) -> list[str]:
    groups = {"all": list_methods(private=False), "dp": list_methods(private=True)}
    return groups.get(arg) or [n.strip() for n in arg.split(",") if n.strip()]


def check_args(args: argparse.Namespace) -> tuple[ExperimentConfig | None, list[str]]:
    """Every flag of the subcommand (and its config keys), all problems in one line, before
    any data is made or read. (config, methods); no config for `federation`."""
    p = Problems()
    cfg, methods = None, []
    if args.command in ("methods", "speed"):
        methods = _methods(args.methods)
        if args.command == "speed" and args.methods == "all":  # concat is the ratios' baseline
            methods = ["concat", *(n for n in methods if n != "concat")]
        check_names(p, "--methods", methods, list_methods())
        check_flag(p, "--synthetic-n", args.synthetic_n, SyntheticSpec.n, low=8)
        check_input_path(p, "--data", args.data)
        base = apply_overrides(ExperimentConfig(), BENCH_DEFAULTS)
        cfg = p.call(config_from_args, args, base)
        check_regime(p, args.data, cfg)
    if args.command == "methods":
        check_flag(p, "--seeds", args.seeds, 3, low=1)
        if cfg is not None:
            args.variants = p.call(variants_from_args, args.vary, cfg) or [{}]
        check_output_dir(p, "--out", args.out)
    else:
        check_flag(p, "--rounds", args.rounds, 3, low=1)
        check_output_file(p, "--out", args.out, "bench.json")
    if args.command == "speed":
        check_flag(p, "--steps", args.steps, 5, low=1)
    if args.command == "federation":
        args.site_counts = _site_counts(p, args.sites)
        check_flag(p, "--deploy-max", args.deploy_max, 8, low=0, high=26)  # sites A, B, ...
        check_flag(p, "--eyes-per-site", args.eyes_per_site, 32, low=8)
    p.raise_if_any()
    return cfg, methods


def variants_from_args(items: list[str], cfg: ExperimentConfig) -> list[dict[str, str]]:
    """Every combination of the `--vary KEY=V1,V2` values, each checked as a config override."""
    axes: list[list[tuple[str, str]]] = []
    for item in items:
        key, sep, values = item.partition("=")
        options = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not key.strip() or not options:
            raise ConfigError(
                f"--vary {item!r}", "expected KEY=V1,V2,...", "e.g. --vary lr=1e-3,2e-3"
            )
        axes.append([(key.strip(), v) for v in options])
    variants = [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]
    for variant in variants:
        apply_overrides(cfg, variant)  # every problem of a value, before any training
    return variants


def _data(args: argparse.Namespace, cfg: ExperimentConfig):
    from remdr.experiment import load_splits

    spec = SyntheticSpec(n=args.synthetic_n, regime=cfg.data.synthetic_regime)
    path = args.data or str(synthetic_data(spec))
    return path, load_splits(path, cfg, split_seed=0)


def cmd_methods(args: argparse.Namespace) -> int:
    cfg, methods = check_args(args)  # before torch is imported: a typo is refused in a moment
    import torch

    from remdr.bench import run_labels, run_methods, summarise, write_curves, write_results
    from remdr.experiment import load_splits
    from remdr.plots import bars_per_bin, scatter_pred_vs_true

    assert cfg is not None
    seeds = list(range(args.seeds))
    path, data = _data(args, cfg)
    print(f"data: {path} ({data.dataset.report.summary()}); split {data.sizes()} (split seed 0)")
    variants = args.variants
    labels = run_labels(methods, variants)
    epochs_note = (
        "epochs as labelled"
        if any("epochs" in v for v in variants)
        else f"{cfg.train.epochs} epochs"
    )
    print(f"{len(methods)} methods x {len(variants)} variants x {len(seeds)} seeds, {epochs_note}")
    out = Path(args.out)
    start = time.perf_counter()

    def show(row: dict) -> None:
        print(
            f"  {row['method']:14s} seed {row['seed']}: val MSE {row['val_mse']:.2f}  "
            f"MSE {row['mse']:.2f}  MAE {row['mae']:.2f}  bin-avg MAE {row['mae_bin_avg']:.2f}  "
            f"({row['train_seconds']:.0f}s, best epoch {row['best_epoch']})",
            flush=True,
        )

    curves: list[dict] | None = [] if args.curves else None
    rows, preds = run_methods(
        cfg, data, methods, seeds, on_result=show, progress=not args.quiet, curves=curves,
        variants=variants, load=lambda run_cfg: load_splits(path, run_cfg, split_seed=0),
    )  # fmt: skip
    summary = summarise(rows, labels)
    wall = time.perf_counter() - start
    if cfg.train.patience:
        epochs_note += f" (early stopping after {cfg.train.patience} epochs without improvement)"
    note = (
        f"{len(seeds)} seeds, {epochs_note}, test n={data.sizes()['test']} eyes "
        f"(MD variance {rows[0]['md_var']:.2f} dB²), split seed 0; errors in dB (MSE in dB²); "
        f"best mean per column in bold. Data: {Path(path).name}. Wall time {wall / 60:.1f} min on "
        f"{platform.machine()} with {torch.get_num_threads()} torch threads."
    )
    write_results(out, rows, summary, note)
    if curves is not None:
        table = write_curves(out, curves, labels)
        with (out / "results.md").open("a") as fh:
            fh.write(
                f"\nLearning curves ({cfg.train.schedule} schedule; test MSE is reported only, "
                "the epoch is chosen on validation):\n\n" + table
            )
    for name, p in preds.items():
        scatter_pred_vs_true(
            p["md"], p["pred"], out / f"pred_vs_true_{name}.png", title=f"{name} (seed 0)"
        )
    bars_per_bin(summary, out / "mae_per_bin.png")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    print((out / "results.md").read_text())
    print(f"wrote {out}/ (results.csv, results.md, plots) in {wall / 60:.1f} min")
    return 0


def cmd_speed(args: argparse.Namespace) -> int:
    from remdr.bench import measure_speed

    cfg, methods = check_args(args)
    assert cfg is not None
    _, data = _data(args, cfg)
    results = measure_speed(cfg, data, methods, steps=args.steps, rounds=args.rounds)
    base = results[0]
    from remdr.runtime import resolve_device

    print(
        f"device {resolve_device(cfg.train.device)}, batch {cfg.train.batch_size}, image {cfg.data.image_size}px, {args.rounds} rounds x {args.steps} steps"
    )
    for r in results:
        mem = f", peak {r.peak_memory_mb:.0f} MiB" if r.peak_memory_mb is not None else ""
        print(
            f"  {r.method:14s} {r.step_seconds * 1000:8.1f} ms/step  {r.pairs_per_second:7.1f} eye pairs/s  "
            f"step ratio vs {base.method}: {r.step_seconds / base.step_seconds:.2f}{mem}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


def _site_counts(p: Problems, text: str) -> list[int]:
    """--sites: one count (a loopback deployment of A, B, ...) or several (the cost curve)."""
    try:
        counts = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        p.add(f"--sites {text}", "expected counts of sites, at least 1", "e.g. --sites 2,4,8,16")
    elif len(counts) == 1:
        check_flag(p, "--sites", counts[0], 2, low=1, high=26)
    return sorted(set(counts))


def cmd_cost_curve(args: argparse.Namespace) -> int:
    """The cost curve: each count of sites simulated, and deployed up to --deploy-max."""
    from dataclasses import asdict

    from remdr.ops.cost_curve import deploy, format_curve, simulate

    points = []
    runs = [("simulation", simulate, n) for n in args.site_counts]
    runs += [("deployment", deploy, n) for n in args.site_counts if n <= args.deploy_max]
    for mode, measure_one, n in runs:
        print(f"remdr-bench: {mode}, {n} sites, {args.rounds} rounds ...", flush=True)
        try:
            points.append(measure_one(n, args.rounds, args.eyes_per_site))
        except RuntimeError as err:  # the machine holds no more: the curve so far still counts
            print(f"remdr-bench: {mode} with {n} sites failed, not in the curve: {err}", flush=True)
            continue
        print(f"remdr-bench: {points[-1]}", flush=True)
    print(format_curve(points), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps([asdict(p) for p in points], indent=2))
    return 0


def cmd_federation(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from remdr.ops.federation_bench import format_cost, measure

    check_args(args)
    if len(args.site_counts) > 1:
        return cmd_cost_curve(args)
    args.sites = args.site_counts[0]
    variants = {"one message per round": {}}
    if args.compare_separate_evaluate:
        variants["separate evaluate message"] = {"separate-evaluate": True}
    results = {}
    for label, overrides in variants.items():
        cost = measure(args.rounds, args.sites, args.eyes_per_site, overrides)
        print(format_cost(cost, label), flush=True)
        results[label] = {
            **asdict(cost),
            "median_overhead": cost.median_overhead,
            "bytes_ratio": cost.bytes_ratio,
        }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


COMMANDS = {"methods": cmd_methods, "speed": cmd_speed, "federation": cmd_federation}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("remdr-bench", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
