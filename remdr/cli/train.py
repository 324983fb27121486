"""remdr-train: centralised training of one method on one dataset, written to a run directory."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from remdr.cli.common import (
    Parser,
    add_config_flags,
    check_flag,
    check_input_path,
    check_output_dir,
    check_regime,
    config_from_args,
    run_cli,
)
from remdr.config import ExperimentConfig
from remdr.data import SyntheticSpec, synthetic_data
from remdr.errors import Problems
from remdr.registry import get_spec, list_methods


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="remdr-train",
        description="Train Re-M3Dr (or a baseline) on one dataset and write a run directory: "
        "model.safetensors, config.json, metrics.json, predictions.csv, pred_vs_true.png.",
    )
    src = ap.add_mutually_exclusive_group()
    src.add_argument(
        "--data", help="Harvard npz folder (flat or train/val/test) or folder with manifest.csv"
    )
    src.add_argument(
        "--synthetic", action="store_true", help="use the embedded synthetic dataset (default)"
    )
    ap.add_argument(
        "--synthetic-n", type=int, default=SyntheticSpec.n, help="eyes in the synthetic set"
    )
    ap.add_argument("--out", default="runs/train", help="run directory to write")
    ap.add_argument(
        "--list-methods", action="store_true", help="print the registered methods and exit"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(ap)
    return ap


def check_args(args: argparse.Namespace) -> ExperimentConfig:
    """Every flag and config key, all problems in one line, before any data is read."""
    p = Problems()
    check_flag(p, "--synthetic-n", args.synthetic_n, SyntheticSpec.n, low=8)
    check_input_path(p, "--data", args.data)
    check_output_dir(p, "--out", args.out)
    cfg = p.call(config_from_args, args)
    check_regime(p, args.data, cfg)
    p.raise_if_any()
    assert cfg is not None
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.list_methods:
            for name in list_methods():
                print(f"{name:15s} {get_spec(name).summary}")
            return 0
        cfg = check_args(args)  # before torch is imported: a typo is refused in a moment
        from remdr.experiment import load_splits, train_and_test, write_run

        private = get_spec(cfg.train.method).private
        if private and not cfg.privacy.dp_ledger:  # the run's own ledger unless one is named
            ledger = str(Path(args.out) / "privacy-ledger.jsonl")
            cfg = dataclasses.replace(
                cfg, privacy=dataclasses.replace(cfg.privacy, dp_ledger=ledger)
            )
        spec = SyntheticSpec(n=args.synthetic_n, regime=cfg.data.synthetic_regime)
        data_path = args.data or str(synthetic_data(spec))
        data = load_splits(data_path, cfg)
        sizes = data.sizes()
        print(f"data: {data.dataset.format}, {data.dataset.report.summary()}; split {sizes}")
        if sizes["train"] < 2:
            from remdr.errors import DataError

            raise DataError(
                "too few training eyes", f"{sizes['train']} after the split", "add data"
            )
        outcome = train_and_test(cfg, data, progress=not args.quiet)
        out = Path(args.out)
        write_run(out, cfg, data, outcome, data_path)
        m = outcome.test_metrics
        if m.get("n"):
            print(
                f"{cfg.train.method}: test MSE {m['mse']:.2f} dB² (MD variance {m['md_var']:.2f}), "
                f"MAE {m['mae']:.2f} dB, R² {m['r2']:.2f}, bin-avg MAE {m['mae_bin_avg']:.2f} dB "
                f"[{outcome.fit.seconds:.0f}s, best epoch {outcome.fit.best_epoch}]"
            )
        if outcome.fit.privacy:
            p = outcome.fit.privacy
            print(
                f"privacy: epsilon {p['epsilon_cumulative']:.2f} at delta {p['delta']:g} per "
                f"patient (sigma {p['noise_multiplier']:.3g}, C {p['max_grad_norm']:g}, "
                f"q {p['sample_rate']:.4f}, {p['steps']} steps; ledger {cfg.privacy.dp_ledger})"
            )
        print(f"wrote {out}/")
        return 0

    return run_cli("remdr-train", run)


if __name__ == "__main__":
    sys.exit(main())
