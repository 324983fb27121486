"""remdr-data: look at a site's data the way training will, before anything trains.

    remdr-data index /pacs/export --out eyes/manifest.csv   # DICOM -> manifest + pairing report
    remdr-data check /data/eyes                             # what --data would load, in one line
    remdr-data dicom-demo /tmp/demo-dicom --n 200           # the synthetic default, as DICOM

`index` writes the eyes it paired as a standard `manifest.csv` (paths relative to it, pointing
at the DICOM files, which are only read) and `pairing.csv` beside it: every file with what
became of it. A site can inspect and edit the manifest and train on it with `--data`.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

from remdr.cli.common import Parser, run_cli
from remdr.config import OCT_VIEW_CHOICES, DataConfig
from remdr.errors import ConfigError, DataError


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="remdr-data", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    ix = sub.add_parser("index", help="pair a DICOM folder into eyes; write manifest + report")
    ix.add_argument("folder", help="a folder of DICOM files (searched recursively)")
    ix.add_argument("--out", default="manifest.csv", help="manifest to write")
    ix.add_argument(
        "--report", default="", help="pairing report (default: pairing.csv beside --out)"
    )
    ix.add_argument("--max-days", type=int, default=None, help="pairing window (default 180)")
    ix.add_argument("--oct-view", default="auto", choices=OCT_VIEW_CHOICES)
    ix.add_argument("--unlabelled", action="store_true", help="keep eyes without a visual field")
    ck = sub.add_parser("check", help="what --data would load: eyes, MD bins, skipped by reason")
    ck.add_argument("folder")
    ck.add_argument("--oct-view", default="auto", choices=OCT_VIEW_CHOICES)
    demo = sub.add_parser("dicom-demo", help="write the synthetic default dataset as DICOM")
    demo.add_argument("out", help="folder to create (must not exist or be empty)")
    demo.add_argument("--n", type=int, default=200, help="eyes")
    demo.add_argument("--oct-view", default="bscans", choices=("bscans", "rnflt"))
    return ap


def data_config(oct_view: str, max_days: int | None = None) -> DataConfig:
    cfg = DataConfig(oct_view=oct_view)
    if max_days is not None:
        if max_days < 0:
            raise ConfigError(f"--max-days {max_days}", "must be >= 0 days")
        cfg.dicom_max_days = max_days
    return cfg


def cmd_index(args: argparse.Namespace) -> int:
    from remdr.data import dicom
    from remdr.data.loading import describe
    from remdr.data.records import LoadReport

    folder = Path(args.folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder", "", "pass the folder of a DICOM export")
    cfg = data_config(args.oct_view, args.max_days)
    report = LoadReport(unit="DICOM files", trace={})
    t0 = time.perf_counter()
    index = dicom.index_folder(
        folder, cfg.oct_view, cfg.dicom_max_days, report, require_md=not args.unlabelled
    )
    seconds = time.perf_counter() - t0
    if not index.pairing.records:
        raise DataError(f"no eyes could be paired in {folder}", report.summary())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    with out.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["eye_id", "md", "oct_path", "fundus_path", "patient_id"])
        for r in index.pairing.records:
            md = "" if r.md != r.md else repr(r.md)  # every digit: the manifest trains alike
            rel = [  # an absent image stays an empty cell
                os.path.relpath(Path(p).resolve(), base) if p else ""
                for p in (r.path, r.fundus_path)
            ]
            w.writerow([r.eye_id, md, *rel, r.patient_id])
    report_path = Path(args.report) if args.report else out.with_name("pairing.csv")
    write_pairing_report(report_path, index, report)
    print(f"{describe(index.pairing.records, 'dicom', report)}; oct-view {index.oct_view}")
    print(f"indexed {index.n_files} files in {seconds:.1f} s")
    print(f"wrote {out} ({len(index.pairing.records)} eyes) and {report_path}")
    return 0


def write_pairing_report(path: Path, index, report) -> None:
    """One row per file: its kind and eye keys, and the eye it joined or why it did not."""
    objects = {o.path: o for o in index.objects}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "kind", "patient_id", "laterality", "date", "status", "eye_or_reason"])
        for p in sorted(set(objects) | set(report.trace)):
            o = objects.get(p)
            keys = [o.kind, o.patient_id, o.laterality, o.date.isoformat()] if o else [""] * 4
            if p in index.pairing.used_by:
                status, detail = "paired", index.pairing.used_by[p]
            else:
                reason = report.trace.get(p, "")
                status = "skipped" if reason in report.skipped else "ignored"
                detail = reason
            w.writerow([p, *keys, status, detail])


def cmd_check(args: argparse.Namespace) -> int:
    from remdr.data import load_dataset
    from remdr.data.loading import describe

    ds = load_dataset(args.folder, data_config(args.oct_view), quiet=True)
    print(f"{describe(ds.records, ds.format, ds.report)}; oct-view {ds.oct_view}")
    return 0


def cmd_dicom_demo(args: argparse.Namespace) -> int:
    from remdr.data import load_dataset, synthetic_data
    from remdr.data.dicom_export import export_eyes
    from remdr.data.synthetic import SyntheticSpec

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty", "", "pass a new folder")
    if args.n < 2:
        raise ConfigError(f"--n {args.n}", "needs at least 2 eyes")
    source = load_dataset(synthetic_data(SyntheticSpec(n=args.n)), DataConfig(), quiet=True)
    files = export_eyes(source.records, out, args.oct_view)
    print(f"wrote {len(files)} DICOM files ({len(source.records)} eyes) under {out}")
    return 0


COMMANDS = {"index": cmd_index, "check": cmd_check, "dicom-demo": cmd_dicom_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("remdr-data", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
