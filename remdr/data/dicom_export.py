"""Write eyes as the ophthalmic DICOM objects a PACS would hold: for tests, benchmarks and demos.

Each eye becomes an OCT (a B-scan volume or a thickness map), a fundus photograph and a visual
field carrying its MD, sharing the patient's ID and the eye's laterality, with study dates a few
days apart. The pixels come from any loadable dataset (the synthetic default), so a DICOM export
of it trains like the original. Every value is generated; nothing here touches real patients.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from remdr.data import dicom
from remdr.data.loading import load_arrays
from remdr.data.records import EyeRecord

UM_PER_UNIT = 0.1  # thickness maps are stored as uint16 in 0.1 µm, with a Real World Value Map


@dataclass(frozen=True)
class Study:
    """One object to write; the fields a PACS export varies (and tests break on purpose)."""

    sop_class: str
    patient_id: str
    laterality: str  # "L", "R" or "" (missing)
    date: dt.date
    pixels: np.ndarray | None = None  # None: no pixel data (a visual field, or a broken image)
    md: float | None = None  # visual fields only; None: no Results Normals Sequence
    laterality_keyword: str = "ImageLaterality"  # visual fields use "Laterality"


def _meta(sop_class: str, transfer_syntax: str):
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax
    return meta


def _set_pixels(ds, arr: np.ndarray, sop_class: str) -> None:
    if sop_class == dicom.OCT_MAP and arr.dtype != np.uint16:
        arr = np.clip(np.round(arr / UM_PER_UNIT), 0, 65535).astype(np.uint16)
        from pydicom.dataset import Dataset

        mapping = Dataset()
        mapping.RealWorldValueSlope = UM_PER_UNIT
        mapping.RealWorldValueIntercept = 0.0
        mapping.LUTLabel = "RNFLT"
        ds.RealWorldValueMappingSequence = [mapping]
    frames = arr.shape[0] if arr.ndim == 3 and sop_class == dicom.OCT_VOLUME else 1
    colour = arr.ndim == 3 and frames == 1
    ds.Rows, ds.Columns = arr.shape[-3:-1] if colour else arr.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "RGB" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    if sop_class == dicom.OCT_VOLUME:
        ds.NumberOfFrames = frames
    bits = arr.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    data = np.ascontiguousarray(arr).tobytes()
    if ds.file_meta.TransferSyntaxUID.is_compressed:  # a stand-in frame: only its syntax matters
        from pydicom.encaps import encapsulate

        data = encapsulate([data])
    ds.PixelData = data


def write_study(path: Path, study: Study, transfer_syntax: str = "1.2.840.10008.1.2.1") -> Path:
    """Write one object as a DICOM Part 10 file (explicit VR little endian by default)."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.file_meta = _meta(study.sop_class, transfer_syntax)
    ds.SOPClassUID = study.sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientID = study.patient_id
    ds.PatientName = "Synthetic^Eye"
    ds.Modality = "OPV" if study.sop_class == dicom.VISUAL_FIELD else "OPT"
    ds.StudyDate = ds.ContentDate = study.date.strftime("%Y%m%d")
    if study.laterality:
        setattr(ds, study.laterality_keyword, study.laterality)
    if study.sop_class == dicom.VISUAL_FIELD and study.md is not None:
        normals = Dataset()
        normals.GlobalDeviationFromNormal = float(study.md)
        ds.ResultsNormalsSequence = [normals]
    if study.pixels is not None:
        _set_pixels(ds, study.pixels, study.sop_class)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def export_eyes(
    records: list[EyeRecord],
    out: Path,
    oct_view: str = "bscans",
    start: dt.date = dt.date(2024, 1, 8),
) -> list[Path]:
    """Write each labelled eye as three objects (OCT, fundus, visual field) under
    `out/<patient>/`; eyes of one patient alternate R, L. Returns the files written."""
    out = Path(out)
    written: list[Path] = []
    side_of: dict[str, int] = {}
    for i, rec in enumerate(records):
        k = side_of.get(rec.patient_id, 0)
        side_of[rec.patient_id] = k + 1
        side = "RL"[k % 2]
        day = start + dt.timedelta(days=30 * (i % 12) + 365 * (k // 2))
        oct_arr, fundus_arr = load_arrays(rec, oct_view)
        folder = out / rec.patient_id
        oct_class = dicom.OCT_VOLUME if oct_view == "bscans" else dicom.OCT_MAP
        written += [
            write_study(
                folder / f"{rec.eye_id}-oct.dcm",
                Study(oct_class, rec.patient_id, side, day, oct_arr),
            ),
            write_study(
                folder / f"{rec.eye_id}-fundus.dcm",
                Study(
                    dicom.FUNDUS_8BIT, rec.patient_id, side, day + dt.timedelta(days=2), fundus_arr
                ),
            ),
            write_study(
                folder / f"{rec.eye_id}-vf.dcm",
                Study(
                    dicom.VISUAL_FIELD,
                    rec.patient_id,
                    side,
                    day + dt.timedelta(days=5),
                    md=rec.md,
                    laterality_keyword="Laterality",
                ),
            ),
        ]
    return written
