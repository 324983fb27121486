"""A folder of ophthalmic DICOM, as a PACS exports it: objects found by SOP Class, paired into eyes.

Every file under the folder is opened (names and extensions mean nothing in DICOM) with pixel
data deferred, so indexing reads headers only. An eye is one visual field (the label: MD is
Global Deviation From Normal inside Results Normals Sequence) with the OCT and the fundus
photograph of the same patient and laterality closest to it in date, each within
`DataConfig.dicom_max_days`. Files that cannot serve are counted by reason in the load report;
files that are not part of an eye but are not wrong either (another SOP class, a later repeat
of a study, an image without a visual field) are counted as ignored. Nothing is written into
the folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remdr.data.records import EyeRecord, LoadReport, check_image_shape, check_md

log = logging.getLogger(__name__)

OCT_VOLUME = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # Ophthalmic Tomography Image Storage
OCT_MAP = "1.2.840.10008.5.1.4.1.1.81.1"  # Ophthalmic Thickness Map Storage
FUNDUS_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"  # Ophthalmic Photography 8 Bit Image Storage
FUNDUS_16BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.2"  # Ophthalmic Photography 16 Bit Image Storage
VISUAL_FIELD = "1.2.840.10008.5.1.4.1.1.80.1"  # Visual Field Static Perimetry Measurements
KINDS = {
    OCT_VOLUME: "oct-volume",
    OCT_MAP: "oct-map",
    FUNDUS_8BIT: "fundus",
    FUNDUS_16BIT: "fundus",
    VISUAL_FIELD: "visual-field",
}
OCT_KIND = {"bscans": "oct-volume", "rnflt": "oct-map"}
DATE_KEYWORDS = ("AcquisitionDateTime", "ContentDate", "AcquisitionDate", "SeriesDate", "StudyDate")
LATERALITY = {"L": "L", "R": "R", "OS": "L", "OD": "R"}
DEFAULT_MAX_DAYS = 180  # a visual field and the images paired with it: at most this far apart


@dataclass(frozen=True)
class DicomObject:
    """What pairing needs of one usable file; pixels stay on disk."""

    path: str
    kind: str  # a value of KINDS
    patient_id: str
    laterality: str  # "L" or "R"
    date: dt.date
    md: float = math.nan  # visual fields only


def is_dicom_file(path: Path) -> bool:
    """DICOM Part 10 files carry "DICM" after a 128-byte preamble, whatever their name."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def candidate_files(root: Path) -> Iterator[Path]:
    """Every file under `root`, recursively, except hidden ones (file names mean nothing in
    DICOM, so each is a candidate)."""
    return (p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def holds_dicom(folder: Path, limit: int = 200) -> bool:
    """True when one of the first `limit` candidate files under the folder is DICOM."""
    for i, path in enumerate(candidate_files(folder)):
        if i >= limit:
            return False
        if is_dicom_file(path):
            return True
    return False


def _date(ds) -> dt.date | None:
    for keyword in DATE_KEYWORDS:
        value = str(ds.get(keyword, "") or "")[:8]
        if len(value) == 8 and value.isdigit():
            try:
                return dt.date(int(value[:4]), int(value[4:6]), int(value[6:8]))
            except ValueError:
                continue
    return None


def _laterality(ds) -> str:
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in LATERALITY:
            return LATERALITY[value]
    return ""


def _visual_field_md(ds) -> tuple[float | None, str]:
    normals = ds.get("ResultsNormalsSequence")
    if not normals:
        return None, "visual field without MD (no Results Normals Sequence)"
    raw = normals[0].get("GlobalDeviationFromNormal")
    if raw is None or raw == "":
        return None, "visual field without MD (no Global Deviation From Normal)"
    return check_md(raw)


def _pixel_problem(ds) -> str:
    """Why the pixels of an image object cannot be used, or ""."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "missing pixel data"
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return ""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"unsupported transfer syntax ({syntax.name})"
    if decoder.is_available:
        return ""
    packages = list(dict.fromkeys(m.split(" - ")[0] for m in decoder.missing_dependencies))
    return f"compressed ({syntax.name}) with no decoder installed: install {' or '.join(packages)}"


def _shape(ds, kind: str) -> tuple[int, ...]:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if kind == "oct-volume":
        return (frames, rows, cols)
    if kind == "fundus" and samples > 1:
        return (rows, cols, samples)
    return (rows, cols) if frames == 1 else (frames, rows, cols)


def read_object(path: Path, report: LoadReport) -> DicomObject | None:
    """Header of one file as a `DicomObject`; None when it is ignored or skipped (counted)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    where = str(path)
    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError):
        report.skip("unreadable or not DICOM", where)
        return None
    sop = str(ds.get("SOPClassUID", "") or getattr(ds.file_meta, "MediaStorageSOPClassUID", ""))
    kind = KINDS.get(sop)
    if kind is None:
        report.ignore("unsupported SOP class", where)
        return None
    patient = str(ds.get("PatientID", "") or "").strip()
    if not patient:
        report.skip("missing Patient ID", where)
        return None
    laterality = _laterality(ds)
    if not laterality:
        report.skip("missing laterality", where)
        return None
    date = _date(ds)
    if date is None:
        report.skip("missing study date", where)
        return None
    if kind == "visual-field":
        md, reason = _visual_field_md(ds)
        if md is None:
            report.skip(reason, where)
            return None
        return DicomObject(where, kind, patient, laterality, date, md)
    reason = _pixel_problem(ds)
    if not reason:
        name = "fundus" if kind == "fundus" else "oct"
        ndim = {"oct-volume": (3,), "oct-map": (2,), "fundus": (2, 3)}[kind]
        reason = check_image_shape(_shape(ds, kind), ndim, name)
    if reason:
        report.skip(reason, where)
        return None
    return DicomObject(where, kind, patient, laterality, date)


def scan_objects(files: list[Path], report: LoadReport) -> list[DicomObject]:
    """Every usable object among `files` (given in path order, so pairing is reproducible)."""
    objects: list[DicomObject] = []
    for path in files:
        obj = read_object(path, report)
        if obj is not None:
            objects.append(obj)
    return objects


def choose_view(objects: list[DicomObject]) -> str:
    """The OCT view most eyes can use: B-scan volumes unless thickness maps are more common."""
    n_volume = sum(o.kind == "oct-volume" for o in objects)
    n_map = sum(o.kind == "oct-map" for o in objects)
    return "rnflt" if n_map > n_volume else "bscans"


@dataclass
class Pairing:
    """Eyes found and what became of every usable object (for the report a site inspects)."""

    records: list[EyeRecord]
    used_by: dict[str, str]  # object path -> eye id (why the others are not: the load report)


def _closest(candidates: list[DicomObject], date: dt.date, max_days: int) -> DicomObject | None:
    """The candidate nearest `date` within `max_days` (ties: path order), or None."""
    within = [c for c in candidates if abs((c.date - date).days) <= max_days]
    return min(within, key=lambda c: (abs((c.date - date).days), c.path), default=None)


def _eye(
    eye_id: str, patient: str, md: float, oct_obj: DicomObject | None, fundus: DicomObject | None
) -> EyeRecord:
    """An eye from the objects found for it; one of the two images may be absent."""
    modalities = tuple(m for m, o in (("oct", oct_obj), ("fundus", fundus)) if o is not None)
    return EyeRecord(
        eye_id,
        patient,
        md,
        "dicom",
        oct_obj.path if oct_obj else "",
        fundus.path if fundus else "",
        modalities=modalities,
    )


def pair_eyes(
    objects: list[DicomObject],
    oct_view: str,
    max_days: int,
    report: LoadReport,
    require_md: bool = True,
) -> Pairing:
    """Pair each visual field with its eye's closest OCT (of `oct_view`) and fundus; an eye
    with only one of them within the window is an incomplete eye (OCT-only or fundus-only).

    With `require_md=False` (prediction), an eye with an OCT but no visual field also gives
    one unlabelled record: its latest OCT with the fundus closest to it, if any.
    """
    oct_kind = OCT_KIND[oct_view]
    eyes: dict[tuple[str, str], dict[str, list[DicomObject]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for obj in objects:
        eyes[(obj.patient_id, obj.laterality)][obj.kind].append(obj)
    records: list[EyeRecord] = []
    used_by: dict[str, str] = {}
    for (patient, side), kinds in sorted(eyes.items()):
        seen_days: set[dt.date] = set()
        for vf in sorted(kinds["visual-field"], key=lambda o: (o.date, o.path)):
            if vf.date in seen_days:
                report.ignore("duplicate visual field (same eye, same day)", vf.path)
                continue
            oct_obj = _closest(kinds[oct_kind], vf.date, max_days)
            fundus_obj = _closest(kinds["fundus"], vf.date, max_days)
            if oct_obj is None and fundus_obj is None:
                reason = f"no OCT and no fundus within {max_days} days of the visual field"
                report.skip(reason, vf.path)
                continue
            seen_days.add(vf.date)
            eye_id = f"{patient}-{side}-{vf.date:%Y%m%d}"
            records.append(_eye(eye_id, patient, vf.md, oct_obj, fundus_obj))
            for obj in (vf, oct_obj, fundus_obj):
                if obj is not None:
                    used_by.setdefault(obj.path, eye_id)
        if not require_md and not seen_days and kinds[oct_kind]:
            latest = max(kinds[oct_kind], key=lambda o: (o.date, o.path))
            fundus_obj = _closest(kinds["fundus"], latest.date, max_days)
            eye_id = f"{patient}-{side}-{latest.date:%Y%m%d}"
            records.append(_eye(eye_id, patient, math.nan, latest, fundus_obj))
            for obj in (latest, fundus_obj):
                if obj is not None:
                    used_by[obj.path] = eye_id
        for kind in (oct_kind, "fundus"):
            for obj in kinds[kind]:
                if obj.path in used_by:
                    continue
                paired_days = [vf.date for vf in kinds["visual-field"] if vf.path in used_by]
                near = any(abs((obj.date - d).days) <= max_days for d in paired_days)
                why = (
                    "duplicate study (a closer one was paired)"
                    if near
                    else "image not paired with a visual field (prediction only)"
                )
                report.ignore(why, obj.path)
        other = "oct-map" if oct_kind == "oct-volume" else "oct-volume"
        for obj in kinds[other]:
            why = f"OCT of the other view (this dataset uses oct-view={oct_view})"
            report.ignore(why, obj.path)
    report.n_ok = len(used_by)
    return Pairing(records, used_by)


@dataclass
class Index:
    """A DICOM folder as remdr sees it: its usable objects, the eyes paired from them, the view."""

    objects: list[DicomObject]
    pairing: Pairing
    oct_view: str
    n_files: int  # candidate files read, of any kind


def index_folder(
    root: Path, oct_view: str, max_days: int, report: LoadReport, require_md: bool = True
) -> Index:
    """Scan and pair a DICOM folder ("auto" picks the OCT view from the objects found)."""
    files = sorted(candidate_files(root))
    objects = scan_objects(files, report)
    view = choose_view(objects) if oct_view == "auto" else oct_view
    report.n_seen = report.n_bad + len(objects)  # files of a known kind, usable or not
    return Index(objects, pair_eyes(objects, view, max_days, report, require_md), view, len(files))


def scan_dicom_dir(
    root: Path, oct_view: str, max_days: int, report: LoadReport, require_md: bool = True
) -> tuple[list[EyeRecord], str]:
    """Records of a DICOM folder and the OCT view used."""
    index = index_folder(root, oct_view, max_days, report, require_md)
    return index.pairing.records, index.oct_view


def read_pixels(path: str) -> np.ndarray:
    """Decoded pixels: (frames, H, W) for a B-scan volume, float µm (H, W) for a thickness map
    (its Real World Value Mapping, else Rescale Slope/Intercept, applied), (H, W) or (H, W, C)
    for a photograph."""
    import pydicom

    ds = pydicom.dcmread(path)
    arr = np.asarray(ds.pixel_array)
    sop = str(ds.get("SOPClassUID", ""))
    if sop == OCT_VOLUME and arr.ndim == 2:
        return arr[None]
    if sop == OCT_MAP:
        mapping = (ds.get("RealWorldValueMappingSequence") or [ds])[0]
        slope = float(mapping.get("RealWorldValueSlope", ds.get("RescaleSlope", 1.0)) or 1.0)
        intercept = float(
            mapping.get("RealWorldValueIntercept", ds.get("RescaleIntercept", 0.0)) or 0.0
        )
        return (arr.astype(np.float32) * slope + intercept).astype(np.float32)
    return arr
