"""Find out what a data folder holds and load its records, validated and counted."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remdr.config import DataConfig
from remdr.data.harvard import load_npz_arrays, scan_npz_dir
from remdr.data.manifest import load_manifest_arrays, scan_manifest
from remdr.data.records import EyeRecord, LoadReport
from remdr.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    """Validated records of one data folder, with the report of what was skipped."""

    root: str
    format: str  # "harvard-npz" or "manifest"
    records: list[EyeRecord]
    report: LoadReport

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
    raise DataError(
        f"no eye data in {path}",
        "found neither *.npz files (flat or in train/ val/ test/) nor a manifest.csv",
        "point --data at a Harvard npz folder or a folder with manifest.csv",
    )


def load_dataset(
    path: str | Path, cfg: DataConfig | None = None, *, require_md: bool = True, quiet: bool = False
) -> Dataset:
    """Scan and validate a data folder. Bad records are skipped and counted; a mostly bad
    dataset raises `DataError` with one line. `require_md=False` admits unlabelled eyes."""
    cfg = cfg or DataConfig()
    path = Path(path)
    fmt = detect_format(path)
    report = LoadReport()
    if fmt == "manifest":
        csv = path if path.is_file() else path / "manifest.csv"
        records = scan_manifest(csv, cfg.oct_view, report, require_md)
        root = csv.parent
    else:
        records = scan_npz_dir(path, cfg.oct_view, report, require_md)
        root = path
    report.check(cfg.max_bad_fraction, str(path))
    if not quiet:
        log.info("%s: %s", path, report.summary())
    return Dataset(root=str(root), format=fmt, records=records, report=report)


def load_arrays(record: EyeRecord, oct_view: str) -> tuple[np.ndarray, np.ndarray]:
    """Raw (oct, fundus) arrays of a record; a file that went bad since the scan is a DataError."""
    try:
        if record.source == "npz":
            return load_npz_arrays(record, oct_view)
        return load_manifest_arrays(record)
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise DataError(f"cannot read eye {record.eye_id} ({record.path})", str(err)) from None
