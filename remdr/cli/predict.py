"""remdr-predict: MD predictions for new eyes from a trained run directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from remdr.cli.common import Parser, check_flag, check_input_path, check_output_file, run_cli
from remdr.config import flat_rules
from remdr.errors import Problems


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="remdr-predict", description="Predict MD (dB) for every eye in a data folder.")
    ap.add_argument(
        "--model", required=True, help="run directory written by remdr-train (or a checkpoint dir)"
    )
    ap.add_argument("--data", required=True, help="Harvard npz folder or folder with manifest.csv")
    ap.add_argument(
        "--out", default="preds.csv", help="CSV to write: eye_id, patient_id, md_pred[, md]"
    )
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    ap.add_argument("--batch-size", type=int, default=64, help="eyes per forward pass")
    return ap


def check_args(args: argparse.Namespace) -> None:
    """Every flag, all problems in one line, before the model or the data is read."""
    p = Problems()
    check_input_path(p, "--model", args.model)
    check_input_path(p, "--data", args.data)
    check_output_file(p, "--out", args.out, "preds.csv")
    check_flag(p, "--device", args.device, "cpu", flat_rules()["device"][0])
    check_flag(p, "--batch-size", args.batch_size, 64, low=1)
    p.raise_if_any()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        check_args(args)
        from remdr.checkpoint import load_run
        from remdr.data import load_dataset
        from remdr.data.dataset import EyeDataset
        from remdr.metrics import metrics_by_kind, scored_metrics
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
        with out.open("w") as fh:  # input: which images the prediction rests on
            fh.write("eye_id,patient_id,md_pred,md,input\n")
            for r, p in zip(ds.records, preds["pred"], strict=True):
                md = "" if np.isnan(r.md) else f"{r.md:.3f}"
                pred = "" if np.isnan(p) else f"{p:.3f}"
                fh.write(f"{r.eye_id},{r.patient_id},{pred},{md},{r.kind}\n")
        predicted = int(np.isfinite(preds["pred"]).sum())
        line = f"predicted {predicted} of {len(ds.records)} eyes ({ds.report.summary()}) -> {out}"
        if predicted < len(ds.records):
            line += f"; {len(ds.records) - predicted} lack the image this {cfg.train.method} model reads"
        known = ~np.isnan(preds["md"]) & np.isfinite(preds["pred"])
        if known.sum() > 1:
            labelled = {k: v[known] for k, v in preds.items()}
            m = scored_metrics(labelled)
            line += f"; on the {int(known.sum())} eyes with a known MD: MSE {m['mse']:.2f}, MAE {m['mae']:.2f} dB"
            kinds = metrics_by_kind(labelled)
            if set(kinds) != {"complete"}:
                line += (
                    " ("
                    + ", ".join(
                        f"{k} {v['n']}: MSE {v['mse']:.2f}"
                        for k, v in kinds.items()
                        if v.get("n", 0) > 1
                    )
                    + ")"
                )
        print(line)
        return 0

    return run_cli("remdr-predict", run)


if __name__ == "__main__":
    sys.exit(main())
