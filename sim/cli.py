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
from typing import Any

from remdr.cli.common import (
    Parser,
    add_config_flags,
    check_flag,
    check_output_dir,
    config_from_args,
    run_cli,
)
from remdr.config import (
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    ExperimentConfig,
    Rule,
    apply_overrides,
    flat_values,
)
from remdr.data import SyntheticSpec, synthetic_data
from remdr.errors import Problems
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


def _final_model(cfg: ExperimentConfig, fed_dir: Path, rounds: int):
    """The federation's model: its best-validation round, else its last round."""
    from safetensors.torch import load_file

    from remdr.methods import build_model

    model = build_model(cfg)
    best = fed_dir / "best.safetensors"
    model.load_state_dict(
        load_file(str(best if best.is_file() else fed_dir / f"round-{rounds:03d}.safetensors"))
    )
    return model


def _one_image_tests(model, test_records: list, cfg: ExperimentConfig) -> dict:
    """The global test set with one image withheld from every eye (`test_oct_only`,
    `test_fundus_only`): what the fused model predicts for an incomplete eye."""
    from remdr.data.dataset import EyeDataset

    if len(model.modalities) < 2:
        return {}
    out = {}
    for m in model.modalities:
        eyes = [dataclasses.replace(r, modalities=(m,)) for r in test_records]
        out[f"test_{m}_only"] = _test_metrics(model, EyeDataset(eyes, cfg.data), cfg)[0]
    return out


def _test_metrics(model, test_ds, cfg: ExperimentConfig):
    from remdr.metrics import scored_metrics
    from remdr.runtime import resolve_device
    from remdr.train import make_loader, predict

    device = resolve_device(cfg.train.device)
    preds = predict(
        model.to(device), make_loader(test_ds, 64, shuffle=False, seed=0, device=device), device
    )
    return scored_metrics(preds), preds


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
        "best_val_mse": outcome.fit.best_val_mse,
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


def check_sim_flags(args: argparse.Namespace) -> tuple[ExperimentConfig, int, dict]:
    """Every problem with the simulator's flags, its config keys (--set, ...) and federation
    keys (--fed), in one line, before any work starts; `resolve_config`'s result when none."""
    from remdr.federation.run_config import split_run_config

    p = Problems()
    check_flag(p, "--sites", args.sites, 4, low=1)
    check_flag(p, "--rounds", args.rounds, 8, low=1)
    check_flag(p, "--synthetic-n", args.synthetic_n, SyntheticSpec.n, low=8)
    check_flag(p, "--local-epochs", args.local_epochs, 1, low=1)
    alpha = Rule(
        "", low=0, low_open=True, fix="smaller is more label skew, e.g. 0.3; 1 is the default"
    )
    check_flag(p, "--alpha", args.alpha, rule=alpha)
    check_flag(p, "--test-fraction", args.test_fraction, 0.2, **PROBABILITY)
    check_flag(p, "--cpus-per-site", args.cpus_per_site, 1.0, **POSITIVE)
    check_flag(p, "--gpus-per-site", args.gpus_per_site, 0.5, **NON_NEGATIVE)
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
    if args.compare_complete_only and args.partition == "predefined":
        p.add("--compare-complete-only with --partition predefined", "not supported",
              "use dirichlet, iid or quantity")  # fmt: skip
    fed = _fed_overrides(args.fed, p)
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


def _fed_overrides(items: list[str], problems: Problems | None = None) -> dict[str, str]:
    """The valid --fed KEY=VALUE items; every malformed item or unknown key is raised at once,
    or added to `problems`."""
    from remdr.config import flat_keys, unknown_key
    from remdr.federation.run_config import fed_keys

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
    from remdr.ops.processes import free_port

    t0 = time.perf_counter()
    cfg, local_epochs, recipe = check_sim_flags(args)
    if recipe:
        print(
            f"{cfg.train.method} is a private method: using the DP recipe (README, Privacy) for "
            "the keys not set on the command line: "
            + ", ".join(f"{k} {v}" for k, v in recipe.items())
            + "; without it DP-SGD learns nothing at these sizes",
            flush=True,
        )
    data_path = args.data or str(synthetic_data(SyntheticSpec(n=args.synthetic_n)))
    dataset = load_dataset(data_path, cfg.data, quiet=True)
    print(f"data: {data_path}: {dataset.report.summary()}")
    out = Path(args.out).resolve()  # replaced only once the data is known to load
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec = PartitionSpec(
        sites=args.sites,
        scheme=args.partition,
        alpha=args.alpha,
        test_fraction=args.test_fraction,
        seed=cfg.train.seed,
        site_modalities=tuple(site_modalities(args)),
        missing_rate=args.missing_rate,
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
    model = _final_model(cfg, out / "federation", args.rounds)
    fed_metrics, fed_preds = _test_metrics(model, test_ds, cfg)
    results = {
        "federated": {
            "test": fed_metrics,
            **_one_image_tests(model, part.test, cfg),
            "wall_seconds": fed_seconds,
            "test_curve": _federated_test_curve(fed_run, model, test_ds, cfg, fed_seconds),
        }
    }
    if args.compare_complete_only:
        complete = [
            n for n, k in zip(part.sites, site_modalities(args), strict=True) if k == "both"
        ]
        root = out / "data" / "complete-sites"  # virtual node k reads <root>/site-<k>
        for k, name in enumerate(complete):
            (root / f"site-{k}").parent.mkdir(parents=True, exist_ok=True)
            (root / f"site-{k}").symlink_to(part.site_dir(name), target_is_directory=True)
        print(f"\nfederated, complete sites only: {', '.join(complete)}")
        t_complete = time.perf_counter()
        complete_config = {
            **run_config,
            "min-nodes": len(complete),
            "out-dir": str(out / "federation-complete"),
            "sim-data-root": str(root),
        }
        complete_log = out / "flower-complete.log"
        code = run_federation(
            complete_config, len(complete), resources, complete_log, stream_printer(),
            (free_port(), free_port()),
        )  # fmt: skip
        check_finished(code, complete_log)
        if RunDirectory(out / "federation-complete").last_round() < args.rounds:
            raise_incomplete(RunDirectory(out / "federation-complete"), complete_log)
        complete_model = _final_model(cfg, out / "federation-complete", args.rounds)
        results["complete_sites_only"] = {
            "sites": complete,
            "test": _test_metrics(complete_model, test_ds, cfg)[0],
            "wall_seconds": time.perf_counter() - t_complete,
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
    for kind in ("oct", "fundus"):
        if f"test_{kind}_only" in results["federated"]:
            rows.append(
                (f" {kind} input only", {"test": results["federated"][f"test_{kind}_only"]})
            )
    if "complete_sites_only" in results:
        rows.append(("complete sites", results["complete_sites_only"]))
    if "centralized" in results:
        rows.append(("centralized", results["centralized"]))
    for name, r in results.get("local", {}).items():
        rows.append((f"local {name}", r))
    lines = [
        f"{'':16s} {'test MSE':>9s} {'MAE':>6s} {'bin-avg MAE':>12s} {'R²':>6s} {'wall s':>7s}"
    ]
    for name, r in rows:
        m = r["test"]
        lines.append(
            f"{name:16s} {m['mse']:9.2f} {m['mae']:6.2f} {m['mae_bin_avg']:12.2f} {m['r2']:6.2f} "
            + (f"{r['wall_seconds']:7.0f}" if "wall_seconds" in r else f"{'':>7s}")
        )
    var = results["federated"]["test"]["md_var"]
    lines.append(f"(test MD variance {var:.2f} dB²: predicting the mean scores MSE {var:.2f})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
