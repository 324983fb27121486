"""Find out what a data folder holds (npz, manifest, DICOM) and load its records, validated
and counted, with the OCT view resolved from the data when the user left it on "auto"."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remdr.config import DataConfig
from remdr.data import dicom
from remdr.data.harvard import OCT_KEYS, load_npz_arrays, npz_headers, scan_npz_dir
from remdr.data.manifest import load_manifest_arrays, read_image, scan_manifest
from remdr.data.records import EyeRecord, LoadReport
from remdr.errors import DataError

VIEW_DATA = {"bscans": "3-D B-scan volumes", "rnflt": "2-D thickness maps"}
PROBE_LIMIT = 20  # records looked at to tell the OCT view of a dataset

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Validated records of one data folder, with the report of what was skipped."""

    root: str
    format: str  # "harvard-npz", "manifest" or "dicom"
    records: list[EyeRecord]
    report: LoadReport
    oct_view: str = "bscans"  # the view the records were validated for (never "auto")

    @property
    def has_splits(self) -> bool:
        return bool(self.records) and all(r.split for r in self.records)


def detect_format(path: Path) -> str:
    if not path.exists():
        raise DataError(
            f"data path {path} does not exist", "", "pass the folder that holds the eyes"
        )
    if path.is_file():
        if path.name.endswith(".csv"):
            return "manifest"
        raise DataError(f"{path} is a file", "expected a folder or a manifest .csv")
    if (path / "manifest.csv").is_file():
        return "manifest"
    if any(path.glob("*.npz")) or any(
        any((path / s).glob("*.npz")) for s in ("train", "val", "test")
    ):
        return "harvard-npz"
    if dicom.holds_dicom(path):
        return "dicom"
    contents = "is empty" if not any(path.iterdir()) else "holds no eye data"
    raise DataError(
        f"the data folder {path} {contents}",
        "expected *.npz files (flat or in train/ val/ test/), a manifest.csv or DICOM files",
        "point --data at a Harvard npz folder, a folder with manifest.csv or a DICOM export",
    )


def probe_oct_view(path: Path, fmt: str) -> str | None:
    """The OCT view a dataset's first readable records hold: "bscans" for 3-D volumes, "rnflt"
    for 2-D maps (npz files holding both give "bscans"); None when nothing could be read."""
    votes = {"bscans": 0, "rnflt": 0}
    if fmt == "harvard-npz":
        files = sorted(path.glob("*.npz")) or sorted(path.glob("*/*.npz"))
        for f in files[:PROBE_LIMIT]:
            try:
                keys = npz_headers(f)
            except Exception:  # an unreadable file has no vote; the scan counts it
                continue
            for view in ("bscans", "rnflt"):
                if OCT_KEYS[view] in keys:
                    votes[view] += 1
                    break
    elif fmt == "manifest":
        import pandas as pd

        csv = path if path.is_file() else path / "manifest.csv"
        try:
            rows = pd.read_csv(csv, dtype=str, nrows=PROBE_LIMIT)
            oct_paths = [csv.parent / str(p) for p in rows.get("oct_path", [])]
        except (OSError, ValueError):
            return None
        for f in oct_paths:
            try:
                ndim = read_image(f).ndim
            except Exception:
                continue
            if ndim in (2, 3):
                votes["bscans" if ndim == 3 else "rnflt"] += 1
    if not any(votes.values()):
        return None
    return max(votes, key=lambda v: (votes[v], v == "bscans"))


def view_mismatch(path: Path, fmt: str, view: str, report: LoadReport) -> DataError | None:
    """A clear error when the chosen OCT view is why the records failed, else None."""
    if fmt == "dicom":
        other_kind = [r for r in report.ignored if r.startswith("OCT of the other view")]
        data_view = ("rnflt" if view == "bscans" else "bscans") if other_kind else None
    else:
        data_view = probe_oct_view(path, fmt)
    if data_view is None or data_view == view:
        return None
    return DataError(
        f"oct-view={view} expects {VIEW_DATA[view]}, but the OCT images in {path} are "
        f"{VIEW_DATA[data_view]}",
        f"{report.n_bad} of {report.n_seen} {report.unit} could not be used for that view",
        f"pass --oct-view {data_view} (or leave it out: remdr then picks the view from the data; "
        f"in a federation set oct-view='{data_view}' in the run config)",
    )


def load_dataset(
    path: str | Path, cfg: DataConfig | None = None, *, require_md: bool = True, quiet: bool = False
) -> Dataset:
    """Scan and validate a data folder. Bad records are skipped and counted; a mostly bad
    dataset raises `DataError` with one line. `require_md=False` admits unlabelled eyes.
    `cfg.oct_view="auto"` is resolved from the data, in `cfg` itself, so the tensors, the model
    and the saved config built from it all use the view of the data."""
    cfg = cfg or DataConfig()
    path = Path(path)
    fmt = detect_format(path)
    report = LoadReport()
    view = cfg.oct_view
    if fmt == "dicom":
        report.unit = "DICOM files"
        records, view = dicom.scan_dicom_dir(path, view, cfg.dicom_max_days, report, require_md)
        root = path
    else:
        if view == "auto":
            view = probe_oct_view(path, fmt) or "bscans"
        if fmt == "manifest":
            csv = path if path.is_file() else path / "manifest.csv"
            records = scan_manifest(csv, view, report, require_md)
            root = csv.parent
        else:
            records = scan_npz_dir(path, view, report, require_md)
            root = path
    report.kinds = Counter(r.kind for r in records)
    explicit = cfg.oct_view != "auto"
    try:
        report.check(cfg.max_bad_fraction, str(path))
    except DataError:
        mismatch = view_mismatch(path, fmt, view, report) if explicit else None
        if mismatch is None:
            raise
        raise mismatch from None
    if explicit and not report.kinds["complete"] + report.kinds["oct-only"]:
        # every eye fundus-only: fine for a fundus-only site, wrong if the OCT is the other view
        mismatch = view_mismatch(path, fmt, view, report)
        if mismatch is not None:
            raise mismatch
    if cfg.oct_view == "auto":
        cfg.oct_view = view
        if not quiet:
            log.info("oct-view: %s (the OCT images are %s)", view, VIEW_DATA[view])
    if not quiet:
        log.info("%s: %s", path, report.summary())
    return Dataset(root=str(root), format=fmt, records=records, report=report, oct_view=view)


def data_stamp(path: str | Path) -> tuple:
    """Every file under a data folder (a manifest's: its folder) as (path, size, mtime): equal
    stamps mean `load_dataset` would read the same files, so a long-lived process may keep its
    scan. Costs a stat per file, where the scan opens every one."""
    path = Path(path)
    root = path if path.is_dir() else path.parent
    files = []
    for folder, _, names in os.walk(root, followlinks=True):
        for name in names:
            full = os.path.join(folder, name)
            try:
                st = os.stat(full)
            except OSError:  # a file removed while we walk: the next stamp differs anyway
                continue
            files.append((os.path.relpath(full, root), st.st_size, st.st_mtime_ns))
    return (str(path.resolve()), tuple(sorted(files)))


def load_arrays(record: EyeRecord, oct_view: str) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Raw (oct, fundus) arrays of a record, None for an absent modality; a file that went bad
    since the scan is a DataError."""
    try:
        if record.source == "npz":
            oct_arr, fundus_arr = load_npz_arrays(record, oct_view)
        elif record.source == "dicom":
            oct_arr = dicom.read_pixels(record.path) if "oct" in record.modalities else None
            fundus_arr = (
                dicom.read_pixels(record.fundus_path) if "fundus" in record.modalities else None
            )
        else:
            oct_arr, fundus_arr = load_manifest_arrays(record)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise DataError(f"cannot read eye {record.eye_id} ({record.path})", str(err)) from None
    return oct_arr, fundus_arr


def describe(records: list[EyeRecord], fmt: str, report: LoadReport) -> str:
    """One line a site reads before joining: eyes, patients, MD by severity bin, what was
    skipped or ignored and why (the same line for `--check-only` and `remdr-data`)."""
    from remdr.metrics import BINS, severity_bins

    md = np.array([r.md for r in records if r.md == r.md], dtype=float)
    bins = severity_bins(md)
    hist = ", ".join(f"{name} {(bins == i).sum()}" for i, name in enumerate(BINS))
    unlabelled = len(records) - len(md)
    extra = f" ({unlabelled} without a visual field: prediction only)" if unlabelled else ""
    patients = len({r.patient_id for r in records})
    return (
        f"{len(records)} eyes of {patients} patients ({fmt}){extra}; MD bins: {hist}; "
        f"{report.summary()}"
    )
