"""remdr-predict: MD predictions for new eyes from a trained run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="remdr-predict", description="Predict MD (dB) for every eye in a data folder."
    )
    ap.add_argument(
        "--model", required=True, help="run directory written by remdr-train (or a checkpoint dir)"
    )
    ap.add_argument("--data", required=True, help="Harvard npz folder or folder with manifest.csv")
    ap.add_argument(
        "--out", default="preds.csv", help="CSV to write: eye_id, patient_id, md_pred[, md]"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=64)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        from remdr.checkpoint import load_run
        from remdr.data import load_dataset
        from remdr.data.dataset import EyeDataset
        from remdr.metrics import regression_metrics
        from remdr.runtime import prepare_model, resolve_device
        from remdr.train import make_loader, predict

        device = resolve_device(args.device)
        model, cfg = load_run(args.model)
        model = prepare_model(model, device)
        ds = load_dataset(args.data, cfg.data, require_md=False)
        eyes = EyeDataset(ds.records, cfg.data, cache=False)
        preds = predict(
            model, make_loader(eyes, args.batch_size, shuffle=False, seed=0, device=device), device
        )
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as fh:
            fh.write("eye_id,patient_id,md_pred,md\n")
            for r, p in zip(ds.records, preds["pred"], strict=True):
                md = "" if np.isnan(r.md) else f"{r.md:.3f}"
                fh.write(f"{r.eye_id},{r.patient_id},{p:.3f},{md}\n")
        known = ~np.isnan(preds["md"])
        line = f"predicted {len(ds.records)} eyes ({ds.report.summary()}) -> {out}"
        if known.sum() > 1:
            m = regression_metrics(preds["md"][known], preds["pred"][known])
            line += f"; on the {int(known.sum())} eyes with a known MD: MSE {m['mse']:.2f}, MAE {m['mae']:.2f} dB"
        print(line)
        return 0

    from remdr.cli.common import run_cli

    return run_cli("remdr-predict", run)


if __name__ == "__main__":
    sys.exit(main())
