"""A generic `manifest.csv`: one row per eye, images as PNG/JPEG/npy files beside it.

Columns: ``eye_id, md, oct_path, fundus_path`` and optionally ``patient_id, site``. Paths are
relative to the manifest's folder; an empty path cell means the eye lacks that image. An OCT image is 2D (used as the RNFLT-style map) or a 3D npy
volume (D, H, W) (used for the B-scan view).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from remdr.data.dicom import is_dicom_file, read_pixels
from remdr.data.records import EyeRecord, LoadReport, check_image_shape, check_md
from remdr.errors import DataError

REQUIRED = ("eye_id", "md", "oct_path", "fundus_path")  # md is optional when predicting
OCT_NDIM = {"bscans": (3,), "rnflt": (2,)}


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to an array: npy as stored, DICOM (e.g. rows written by
    `remdr-data index`) as its pixels, PNG/JPEG as (H, W) or (H, W, C)."""
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix.lower() == ".dcm" or is_dicom_file(path):
        return read_pixels(str(path))
    with Image.open(path) as im:
        im.load()
        if im.mode not in ("L", "RGB", "I;16", "I", "F"):
            im = im.convert("RGB")
        return np.asarray(im)


def _check_image(path: Path, name: str, ndim: tuple[int, ...]) -> str:
    if not path.is_file():
        return f"{name} file missing"
    try:
        arr = read_image(path)
    except Exception:  # PIL, numpy and pydicom each raise their own kinds for a broken file
        return f"{name} file unreadable"
    if arr.dtype.kind not in "uif":
        return f"{name} has wrong dtype"
    return check_image_shape(arr.shape, ndim, name)


def scan_manifest(
    csv_path: Path, oct_view: str, report: LoadReport, require_md: bool = True
) -> list[EyeRecord]:
    root = csv_path.parent
    try:
        df = pd.read_csv(csv_path, dtype={"eye_id": str, "patient_id": str, "site": str})
    except (OSError, ValueError, pd.errors.ParserError) as err:
        raise DataError(f"cannot read {csv_path.name}", str(err).splitlines()[0]) from None
    missing = [c for c in REQUIRED if c not in df.columns and (require_md or c != "md")]
    if missing:
        raise DataError(
            f"{csv_path.name} lacks column(s) {', '.join(missing)}",
            f"needs {', '.join(REQUIRED)} [, patient_id, site]",
        )
    records: list[EyeRecord] = []
    for i, row in enumerate(df.itertuples(index=False)):
        report.n_seen += 1
        where = f"{csv_path.name}:{i + 2}"
        md, reason = check_md(getattr(row, "md", None))
        if md is None:
            if require_md:
                report.skip(reason, where)
                continue
            md = float("nan")
        paths = {"oct": _cell(row.oct_path), "fundus": _cell(row.fundus_path)}
        modalities = tuple(m for m, p in paths.items() if p)
        if not modalities:  # one image alone is an incomplete eye; none is no eye
            report.skip("no image (oct_path and fundus_path both empty)", where)
            continue
        ndims = {"oct": OCT_NDIM[oct_view], "fundus": (2, 3)}
        reason = next(
            (r for m in modalities if (r := _check_image(root / paths[m], m, ndims[m]))), ""
        )
        if reason:
            report.skip(reason, where)
            continue
        patient = getattr(row, "patient_id", None)
        site = getattr(row, "site", None)
        report.n_ok += 1
        records.append(
            EyeRecord(
                eye_id=str(row.eye_id),
                patient_id=str(patient)
                if isinstance(patient, str) and patient
                else str(row.eye_id),
                md=md,
                source="manifest",
                path=str(root / paths["oct"]) if paths["oct"] else "",
                fundus_path=str(root / paths["fundus"]) if paths["fundus"] else "",
                site=str(site) if isinstance(site, str) else "",
                modalities=modalities,
            )
        )
    return records


def _cell(value) -> str:
    """A path cell; empty (or NaN, as pandas reads an empty cell) means the image is absent."""
    return (
        "" if value is None or (isinstance(value, float) and value != value) else str(value).strip()
    )


def load_manifest_arrays(record: EyeRecord) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(oct, fundus) arrays of a row; None for a modality the eye does not have (its path may
    still be set: the simulator withholds an image by the record's modalities)."""
    return (
        read_image(Path(record.path)) if "oct" in record.modalities else None,
        read_image(Path(record.fundus_path)) if "fundus" in record.modalities else None,
    )
