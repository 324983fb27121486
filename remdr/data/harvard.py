"""Harvard Ophthalmology AI Lab npz files (FairVision glaucoma, Harvard-GF and relatives).

One file per eye. Validation reads only the npy headers inside each npz (shape, dtype) and the
scalar keys, so scanning thousands of 200^3 volumes stays fast; pixels are read when training.
Files are opened with ``allow_pickle=False``: a data file can never run code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from remdr.data.records import EyeRecord, LoadReport, check_image_shape, check_md

OCT_KEYS = {"bscans": "oct_bscans", "rnflt": "rnflt"}
OCT_NDIM = {"bscans": (3,), "rnflt": (2,)}
FUNDUS_KEY = "slo_fundus"
MD_KEY = "md"
DEMOGRAPHIC_KEYS = ("age", "male", "race", "ethnicity", "hispanic", "gender", "language")


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every array in an npz, without reading the data."""
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if not name.endswith(".npy"):
                continue
            with zf.open(name) as fh:
                major, _ = np.lib.format.read_magic(fh)
                if major == 1:
                    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
                else:
                    shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            out[name[: -len(".npy")]] = (tuple(shape), dtype)
    return out


def _scalar(value: np.ndarray) -> Any:
    """Demographics come as 0-d arrays of numbers or strings (`race` may be a string)."""
    item = value.item() if value.size == 1 else value.tolist()
    return item.decode() if isinstance(item, bytes) else item


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "uif"


def read_npz_record(
    path: Path, oct_view: str, report: LoadReport, split: str = "", require_md: bool = True
) -> EyeRecord | None:
    """Validate one file; return its record, or count why it was skipped and return None.

    With `require_md=False` (prediction for new eyes) a missing or invalid MD becomes NaN.
    """
    where = str(path)
    try:
        headers = npz_headers(path)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        report.skip("unreadable file", where)
        return None
    oct_key = OCT_KEYS[oct_view]
    if require_md and MD_KEY not in headers:
        report.skip(f"missing key '{MD_KEY}'", where)
        return None
    images = {"oct": oct_key, "fundus": FUNDUS_KEY}
    modalities = tuple(m for m, key in images.items() if key in headers)
    if not modalities:  # an eye needs at least one image; one alone is an incomplete eye
        report.skip(f"no image (neither '{oct_key}' nor '{FUNDUS_KEY}')", where)
        return None
    checks = {"oct": (oct_key, OCT_NDIM[oct_view]), "fundus": (FUNDUS_KEY, (2, 3))}
    for name in modalities:
        key, ndim = checks[name]
        shape, dtype = headers[key]
        if not _numeric(dtype):
            report.skip(f"{name} has wrong dtype", where)
            return None
        reason = check_image_shape(shape, ndim, name)
        if reason:
            report.skip(reason, where)
            return None
    try:
        with np.load(path, allow_pickle=False) as z:
            raw_md = z[MD_KEY] if MD_KEY in z.files else None
            md, reason = check_md(
                raw_md.item() if raw_md is not None and raw_md.size == 1 else None
            )
            extras = {k: _scalar(z[k]) for k in z.files if k in DEMOGRAPHIC_KEYS and z[k].size == 1}
            patient = _scalar(z["patient_id"]) if "patient_id" in z.files else path.stem
            site = _scalar(z["site"]) if "site" in z.files else ""
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        report.skip("unreadable file", where)
        return None
    if md is None:
        if require_md:
            report.skip(reason, where)
            return None
        md = float("nan")
    return EyeRecord(
        eye_id=path.stem,
        patient_id=str(patient),
        md=md,
        source="npz",
        path=str(path),
        site=str(site),
        split=split,
        demographics=extras,
        modalities=modalities,
    )


def load_npz_arrays(
    record: EyeRecord, oct_view: str
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(oct, fundus) arrays of one record: oct is (D, H, W) for bscans, (H, W) for rnflt;
    None for a modality the eye does not have."""
    with np.load(record.path, allow_pickle=False) as z:
        oct_arr = np.asarray(z[OCT_KEYS[oct_view]]) if "oct" in record.modalities else None
        fundus_arr = np.asarray(z[FUNDUS_KEY]) if "fundus" in record.modalities else None
    return oct_arr, fundus_arr


def scan_npz_dir(
    root: Path, oct_view: str, report: LoadReport, require_md: bool = True
) -> list[EyeRecord]:
    """Records of a folder of npz files, flat or in train/ val/ test/ subfolders."""
    records: list[EyeRecord] = []
    split_dirs = [s for s in ("train", "val", "test") if (root / s).is_dir()]
    groups = [(root / s, s) for s in split_dirs] if split_dirs else [(root, "")]
    for folder, split in groups:
        for path in sorted(folder.glob("*.npz")):
            report.n_seen += 1
            rec = read_npz_record(path, oct_view, report, split, require_md)
            if rec is not None:
                report.n_ok += 1
                records.append(rec)
    return records
