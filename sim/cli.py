"""remdr-sim: a whole multi-site federation on one machine, with Flower's simulation runtime.

Makes or loads the data, keeps a global test set apart, partitions the rest into hospital sites
(label skew by Dirichlet(alpha) over MD severity bins, quantity skew, or the dataset's own sites),
runs federated training with one virtual SuperNode per site, and writes a run directory with
report.json, report.md and plots. Optionally trains the same model centrally on the union of the
sites' data (--compare-centralized) and on each site alone (--compare-local).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path

from remdr.cli.common import add_config_flags, config_from_args, run_cli
from remdr.config import ExperimentConfig, apply_overrides, flat_values
from remdr.data import SyntheticSpec, synthetic_data
from remdr.federation.run_config import FEDERATED_DEFAULTS

# Defaults that finish on a 2-core CPU in a few minutes and still show learning; the federated
# training defaults (remdr.federation.run_config.FEDERATED_DEFAULTS) apply to both the federation
# and the centralized comparison, so the two differ only in where the data is.
SIM_DEFAULTS = {**FEDERATED_DEFAULTS, "method": "concat", "lr": 1e-3}

# The DP recipe of the README (Privacy, "Measured utility and cost"): DP-SGD learns only with
# large batches (q ~ 0.5), more passes over the data and a constant learning rate; at the
# defaults above a private method predicts the mean. A private method gets it for every key the
# user does not set; batch-size is half the smallest site's training patients (q = 0.5 there).
DP_RECIPE = {
    "batch-size": "half the smallest site's training patients",
    "local-epochs": 4,
    "lr": 3e-3,
    "schedule": "constant",
    "dp-target-epsilon": 8.0,  # sigma solved so the planned rounds end there (not if dp-noise is set)
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="remdr-sim", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", help="dataset folder (default: the embedded synthetic set)")
    ap.add_argument(
        "--synthetic-n", type=int, default=SyntheticSpec.n, help="eyes in the synthetic set"
    )
    ap.add_argument("--out", default="runs/sim", help="run directory (replaced if it exists)")
    ap.add_argument("--sites", type=int, default=4)
    ap.add_argument(
        "--partition", default="dirichlet", choices=["dirichlet", "iid", "quantity", "predefined"]
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
    ap.add_argument("--rounds", type=int, default=8)
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
    ap.add_argument("--cpus-per-site", type=float, default=1.0, help="CPU cores per virtual site")
    ap.add_argument(
        "--gpus-per-site", type=float, default=0.0, help="GPU fraction per virtual site"
    )
    ap.add_argument(
        "--compare-centralized", action="store_true", help="also train on the union of site data"
    )
    ap.add_argument("--compare-local", action="store_true", help="also train each site alone")
    ap.add_argument(
        "--fed",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any federation key, e.g. --fed site-dp=fixed --fed on-missing=abort",
    )
    ap.add_argument("--quiet", action="store_true")
    add_config_flags(ap)
    return ap


def _test_metrics(model, test_ds, cfg: ExperimentConfig):
    from remdr.metrics import regression_metrics
    from remdr.runtime import resolve_device
    from remdr.train import make_loader, predict

    device = resolve_device(cfg.train.device)
    preds = predict(
        model.to(device), make_loader(test_ds, 64, shuffle=False, seed=0, device=device), device
    )
    return regression_metrics(preds["md"], preds["pred"]), preds


def _train_central(
    cfg: ExperimentConfig,
    dataset,
    train_ds,
    val_ds,
    test_ds,
    *,
    epochs: int,
    desc: str,
    progress: bool,
) -> dict:
    """Pooled training on `train_ds` with the sites' settings, tested on the global test set."""
    from remdr.experiment import SplitData, train_and_test

    # the same passes over the data and the same learning-rate schedule as the federation
    central_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs))
    outcome = train_and_test(
        central_cfg, SplitData(dataset, train_ds, val_ds, test_ds), progress=progress, desc=desc,
        test_curve=True,
    )  # fmt: skip
    return {
        "test": outcome.test_metrics,
        "wall_seconds": outcome.fit.seconds,
        "test_curve": outcome.test_curve,
    }


def explicit_keys(args: argparse.Namespace) -> set[str]:
    """The config and federation keys the user set on the command line."""
    from remdr.cli.common import COMMON_FLAGS

    keys = {k for k in COMMON_FLAGS if getattr(args, k.replace("-", "_"), None) is not None}
    keys |= {item.split("=", 1)[0].strip().replace("_", "-") for item in [*args.set, *args.fed]}
    if args.local_epochs is not None:
        keys.add("local-epochs")
    return keys


def check_sim_flags(args: argparse.Namespace) -> None:
    """Every problem with the simulator's own flags, in one line, before any work starts."""
    import math

    from remdr.errors import Problems

    p = Problems()
    for flag, value, low in (("--sites", args.sites, 1), ("--rounds", args.rounds, 1),
                             ("--synthetic-n", args.synthetic_n, 8)):  # fmt: skip
        if value < low:
            p.add(f"{flag} {value}", f"must be at least {low}")
    if args.local_epochs is not None and args.local_epochs < 1:
        p.add(f"--local-epochs {args.local_epochs}", "must be at least 1")
    if not (math.isfinite(args.alpha) and args.alpha > 0):
        p.add(f"--alpha {args.alpha:g}", "the Dirichlet concentration must be a positive number",
              "smaller is more label skew, e.g. 0.3; 1 is the default")  # fmt: skip
    if not (math.isfinite(args.test_fraction) and 0 < args.test_fraction < 1):
        p.add(f"--test-fraction {args.test_fraction:g}", "must be between 0 and 1, e.g. 0.2")
    for flag, value in (("--cpus-per-site", args.cpus_per_site),
                        ("--gpus-per-site", args.gpus_per_site)):  # fmt: skip
        if not (math.isfinite(value) and value >= 0):
            p.add(f"{flag} {value:g}", "must be a number of at least 0")
    if args.cpus_per_site == 0:
        p.add("--cpus-per-site 0", "a virtual site needs some CPU, e.g. 1")
    p.raise_if_any()


def resolve_config(args: argparse.Namespace) -> tuple[ExperimentConfig, int, dict]:
    """(core config, local epochs, the DP recipe keys used): a private method gets the
    README's DP recipe for every recipe key the user did not set."""
    from remdr.methods import get_spec

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


def _fed_overrides(items: list[str]) -> dict[str, str]:
    from remdr.errors import ConfigError
    from remdr.federation.run_config import fed_keys

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or key not in fed_keys():
            raise ConfigError(
                f"--fed {item!r}", "expected KEY=VALUE with a federation key",
                f"valid keys: {', '.join(fed_keys())}",
            )  # fmt: skip
        out[key] = value.strip()
    return out


def main(argv: list[str] | None = None) -> int:
    import signal

    args = build_parser().parse_args(argv)

    def on_term(signum, frame):  # `kill` cleans up like Ctrl-C: the runner's finally stops Flower
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    # Ctrl-C / kill -INT clean up even when started as a background job (SIGINT inherited ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return run_cli("remdr-sim", lambda: simulate(args))


def simulate(args: argparse.Namespace) -> int:
    from remdr.sim.partition import PartitionSpec, partition
    from remdr.sim.report import write_sim_report
    from remdr.sim.runner import SimResources, check_finished, run_federation, stream_printer

    from remdr.data import load_dataset
    from remdr.data.dataset import EyeDataset
    from remdr.federation.run_config import split_run_config
    from remdr.federation.run_directory import RunDirectory, clean
    from remdr.federation.site_round import load_site
    from remdr.methods import build_model
    from remdr.ops.processes import free_port

    t0 = time.perf_counter()
    check_sim_flags(args)
    cfg, local_epochs, recipe = resolve_config(args)
    if recipe:
        print(
            f"{cfg.train.method} is a private method: using the DP recipe (README, Privacy) for "
            "the keys not set on the command line: "
            + ", ".join(f"{k} {v}" for k, v in recipe.items())
            + "; without it DP-SGD learns nothing at these sizes",
            flush=True,
        )
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    data_path = args.data or str(synthetic_data(SyntheticSpec(n=args.synthetic_n)))
    dataset = load_dataset(data_path, cfg.data, quiet=True)
    print(f"data: {data_path}: {dataset.report.summary()}")
    spec = PartitionSpec(
        sites=args.sites,
        scheme=args.partition,
        alpha=args.alpha,
        test_fraction=args.test_fraction,
        seed=cfg.train.seed,
    )
    part = partition(dataset, spec, out / "data")
    print(
        f"partition ({args.partition}, alpha={args.alpha}, seed {spec.seed}); eyes per severity bin:\n{part.table()}"
    )
    if "batch-size" in recipe:
        patients = [len({r.patient_id for r in recs}) for recs in part.sites.values()]
        batch = dp_batch_size(patients, cfg.data.val_fraction)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
        print(f"DP recipe: batch-size {batch} (site patients {sorted(patients)})")

    run_config = {
        **flat_values(cfg),
        "num-server-rounds": args.rounds,
        "local-epochs": local_epochs,
        "strategy": args.strategy,
        "fedbn": args.fedbn,
        "min-nodes": len(part.sites),
        "out-dir": str(out / "federation"),
        "sim-data-root": str(out / "data" / "sites"),
    }
    run_config.update(_fed_overrides(args.fed))
    split_run_config(run_config)  # fail early on a bad combination
    print(
        f"federated: {len(part.sites)} sites x {args.rounds} rounds x {local_epochs} local epoch(s), {cfg.train.method}, {args.strategy}"
    )
    t_fed = time.perf_counter()
    log_path = out / "flower.log"
    ports = (free_port(), free_port())  # the local SuperLink's HTTP and Control API ports
    resources = SimResources(args.cpus_per_site, args.gpus_per_site)
    code = run_federation(run_config, len(part.sites), resources, log_path, stream_printer(), ports)
    check_finished(code, log_path)
    fed_run = RunDirectory(out / "federation")
    if fed_run.last_round() < args.rounds:
        raise_incomplete(fed_run, log_path)
    fed_seconds = time.perf_counter() - t_fed

    test_ds = EyeDataset(part.test, cfg.data)
    model = build_model(cfg)
    weights = out / "federation" / "best.safetensors"
    from safetensors.torch import load_file

    model.load_state_dict(
        load_file(
            str(
                weights
                if weights.is_file()
                else out / "federation" / f"round-{args.rounds:03d}.safetensors"
            )
        )
    )
    fed_metrics, fed_preds = _test_metrics(model, test_ds, cfg)
    results = {
        "federated": {
            "test": fed_metrics,
            "wall_seconds": fed_seconds,
            "test_curve": _federated_test_curve(fed_run, model, test_ds, cfg, fed_seconds),
        }
    }

    epochs = args.rounds * local_epochs
    sites = {name: load_site(part.site_dir(name), cfg, seed=cfg.train.seed) for name in part.sites}
    if args.compare_centralized:
        union_train = EyeDataset([r for s in sites.values() for r in s.train.records], cfg.data)
        union_val = EyeDataset([r for s in sites.values() for r in s.val.records], cfg.data)
        results["centralized"] = {
            **_train_central(
                cfg, dataset, union_train, union_val, test_ds,
                epochs=epochs, desc="centralized", progress=not args.quiet,
            ),
            "epochs": epochs,
        }  # fmt: skip
    if args.compare_local:
        results["local"] = {
            name: _train_central(
                cfg, dataset, site.train, site.val, test_ds,
                epochs=epochs, desc=f"local {name}", progress=not args.quiet,
            )
            for name, site in sites.items()
        }  # fmt: skip

    report = {
        "config": cfg.to_dict(),
        "run_config": run_config,
        "partition": part.summary(),
        "federation": json.loads((out / "federation" / "report.json").read_text()),
        "results": results,
        "wall_seconds": time.perf_counter() - t0,
        "local_superlink_ports": list(ports),
    }
    (out / "report.json").write_text(json.dumps(clean(report), indent=2, default=str))
    md_path = write_sim_report(out, report, fed_preds)
    print()
    print(summary_table(results))
    print(f"\nwall time {report['wall_seconds']:.0f}s; report: {md_path}")
    return 0


def _federated_test_curve(fed_run, model, test_ds, cfg, fed_seconds: float) -> list:
    """(seconds since the federation started, test MSE) after every round: the wall-clock
    view beside the centralized one. Whatever is not a round's own time (Flower's start-up,
    the final evaluation, shutdown) is counted before round 1, against the federation."""
    records = fed_run.records()
    elapsed = max(0.0, fed_seconds - sum(float(r.get("seconds", 0.0)) for r in records))
    curve = []
    for rec in records:
        elapsed += float(rec.get("seconds", 0.0))
        model.load_state_dict(fed_run.load_weights(rec["round"]))
        curve.append((elapsed, float(_test_metrics(model, test_ds, cfg)[0]["mse"])))
    return curve


def raise_incomplete(fed_run, log_path: Path) -> None:
    from remdr.errors import RemdrError

    raise RemdrError(
        f"the federation stopped after {fed_run.last_round()} round(s)",
        "sites failed or did not answer (see the errors in the round records)",
        f"see {log_path}",
    )


def summary_table(results: dict) -> str:
    rows = [("federated", results["federated"])]
    if "centralized" in results:
        rows.append(("centralized", results["centralized"]))
    for name, r in results.get("local", {}).items():
        rows.append((f"local {name}", r))
    lines = [
        f"{'':14s} {'test MSE':>9s} {'MAE':>6s} {'bin-avg MAE':>12s} {'R²':>6s} {'wall s':>7s}"
    ]
    for name, r in rows:
        m = r["test"]
        lines.append(
            f"{name:14s} {m['mse']:9.2f} {m['mae']:6.2f} {m['mae_bin_avg']:12.2f} {m['r2']:6.2f} {r['wall_seconds']:7.0f}"
        )
    var = results["federated"]["test"]["md_var"]
    lines.append(f"(test MD variance {var:.2f} dB²: predicting the mean scores MSE {var:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
