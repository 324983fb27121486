"""A folder of generated ophthalmic DICOM: pairing into eyes, every skip reason counted, the
manifest it indexes to, training on it, and nothing written into it."""

from __future__ import annotations

import csv
import datetime as dt
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from commands import run_in_process
from conftest import TINY

from remdr.config import DataConfig, ExperimentConfig, apply_overrides
from remdr.data import dicom, load_dataset
from remdr.data.dicom_export import Study, export_eyes, write_study
from remdr.data.loading import load_arrays
from remdr.errors import DataError

BIN = Path(sys.executable).parent
JPEG_LS = "1.2.840.10008.1.2.4.80"  # no decoder for it is installed beside remdr
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DAY = dt.date(2023, 3, 1)
IMG = np.full((32, 32), 90, np.uint8)
VOL = np.full((4, 32, 32), 60, np.uint8)

# What the broken and unpaired files below must be counted as.
SKIPPED = {
    "unreadable or not DICOM": 1,
    "missing pixel data": 1,
    "missing laterality": 1,
    "visual field without MD (no Results Normals Sequence)": 1,
    "no OCT and no fundus within 180 days of the visual field": 1,
    "compressed (JPEG-LS Lossless Image Compression) with no decoder installed: "
    "install gdcm or pylibjpeg or pyjpegls": 1,
}
IGNORED = {
    "unsupported SOP class": 1,
    "duplicate study (a closer one was paired)": 1,
    "image not paired with a visual field (prediction only)": 4,
}


def _add_broken_and_unpaired(root: Path, first_patient: str) -> None:
    bad = root / "incoming"
    (bad / "notes.txt").parent.mkdir(parents=True)
    (bad / "notes.txt").write_text("not an image")
    write_study(bad / "sc.dcm", Study(SECONDARY_CAPTURE, "PX0", "R", DAY, IMG))
    # PX1: the OCT has no pixel data, so the eye is fundus-only
    write_study(bad / "px1-oct", Study(dicom.OCT_VOLUME, "PX1", "R", DAY))
    write_study(bad / "px1-fun", Study(dicom.FUNDUS_8BIT, "PX1", "R", DAY, IMG))
    write_study(bad / "px1-vf", Study(dicom.VISUAL_FIELD, "PX1", "R", DAY, md=-3.0))
    # PX2: the fundus is JPEG-LS compressed and nothing installed decodes it: OCT-only
    write_study(bad / "px2-oct", Study(dicom.OCT_VOLUME, "PX2", "L", DAY, VOL))
    write_study(bad / "px2-fun", Study(dicom.FUNDUS_8BIT, "PX2", "L", DAY, IMG), JPEG_LS)
    write_study(bad / "px2-vf", Study(dicom.VISUAL_FIELD, "PX2", "L", DAY, md=-8.0))
    # PX3: the fundus has no laterality, the visual field no MD: an OCT to predict for
    write_study(bad / "px3-oct", Study(dicom.OCT_VOLUME, "PX3", "R", DAY, VOL))
    write_study(bad / "px3-fun", Study(dicom.FUNDUS_8BIT, "PX3", "", DAY, IMG))
    write_study(bad / "px3-vf", Study(dicom.VISUAL_FIELD, "PX3", "R", DAY))
    # PX4: the only fundus is 400 days after the visual field: OCT-only
    write_study(bad / "px4-oct", Study(dicom.OCT_VOLUME, "PX4", "R", DAY, VOL))
    later = DAY + dt.timedelta(days=400)
    write_study(bad / "px4-fun", Study(dicom.FUNDUS_8BIT, "PX4", "R", later, IMG))
    write_study(bad / "px4-vf", Study(dicom.VISUAL_FIELD, "PX4", "R", DAY, md=-1.0))
    # PX5: images without any visual field: an eye to predict for, not to train on
    write_study(bad / "px5-oct", Study(dicom.OCT_VOLUME, "PX5", "L", DAY, VOL))
    write_study(bad / "px5-fun", Study(dicom.FUNDUS_8BIT, "PX5", "L", DAY, IMG))
    # PX6: a visual field with no image at all
    write_study(bad / "px6-vf", Study(dicom.VISUAL_FIELD, "PX6", "R", DAY, md=-2.0))
    # a repeat OCT of the first exported eye, further from its visual field than the original
    first = sorted((root / first_patient).glob("*-vf.dcm"))[0]
    import pydicom

    vf = pydicom.dcmread(first)
    vf_day = dt.datetime.strptime(vf.ContentDate, "%Y%m%d").date()
    repeat = Study(dicom.OCT_VOLUME, vf.PatientID, vf.Laterality, vf_day + dt.timedelta(20), VOL)
    write_study(bad / "repeat-oct.dcm", repeat)


@pytest.fixture(scope="module")
def dicom_folder(tiny_data, tmp_path_factory) -> Path:
    """The tiny dataset's 48 eyes as OCT volume + fundus + visual field, plus broken files."""
    root = tmp_path_factory.mktemp("pacs")
    records = load_dataset(tiny_data, DataConfig(), quiet=True).records
    export_eyes(records, root, "bscans")
    _add_broken_and_unpaired(root, records[0].patient_id)
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_eyes_are_paired_and_every_bad_file_is_counted_by_reason(dicom_folder, tiny_data):
    before = _snapshot(dicom_folder)
    ds = load_dataset(dicom_folder, DataConfig())
    assert ds.format == "dicom" and ds.oct_view == "bscans"
    assert len(ds.records) == 51
    assert ds.report.kinds == {"complete": 48, "oct-only": 2, "fundus-only": 1}
    assert {r.patient_id: r.kind for r in ds.records if r.patient_id.startswith("PX")} == {
        "PX1": "fundus-only",
        "PX2": "oct-only",
        "PX4": "oct-only",
    }
    assert dict(ds.report.skipped) == SKIPPED
    assert dict(ds.report.ignored) == IGNORED
    assert "48 complete, 2 oct-only, 1 fundus-only" in ds.report.summary()
    # each eye is its original: same MD, same patient, same pixels
    original = {
        (r.patient_id, round(r.md, 4)): r for r in load_dataset(tiny_data, DataConfig()).records
    }
    for rec in (r for r in ds.records if r.kind == "complete"):
        src = original[(rec.patient_id, round(rec.md, 4))]
        oct_arr, fundus_arr = load_arrays(rec, "bscans")
        want_oct, want_fundus = load_arrays(src, "bscans")
        assert np.array_equal(oct_arr, want_oct) and np.array_equal(fundus_arr, want_fundus)
    assert _snapshot(dicom_folder) == before  # nothing written into the DICOM folder


def test_prediction_keeps_the_eye_without_a_visual_field(dicom_folder):
    ds = load_dataset(dicom_folder, DataConfig(), require_md=False)
    unlabelled = [r for r in ds.records if np.isnan(r.md)]
    assert {r.patient_id: r.kind for r in unlabelled} == {"PX3": "oct-only", "PX5": "complete"}


def test_pairing_window_is_a_setting(dicom_folder):
    cfg = apply_overrides(ExperimentConfig(), {"dicom-max-days": 500}).data
    ds = load_dataset(dicom_folder, cfg)
    # PX4's fundus, 400 days away, now pairs
    assert next(r for r in ds.records if r.patient_id == "PX4").kind == "complete"


def test_index_writes_a_manifest_that_trains_exactly_like_the_folder(dicom_folder, tmp_path):
    from remdr.experiment import load_splits, train_and_test

    out = tmp_path / "site" / "manifest.csv"
    done = subprocess.run(
        [BIN / "remdr-data", "index", str(dicom_folder), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "51 eyes of" in done.stdout and "missing laterality: 1" in done.stdout
    files = sum(1 for p in dicom_folder.rglob("*") if p.is_file())
    assert f"indexed {files} files" in done.stdout
    with (out.parent / "pairing.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    statuses = Counter(r["status"] for r in rows)
    assert statuses == {"paired": 150, "skipped": sum(SKIPPED.values()), "ignored": 6}
    laterality = next(r for r in rows if r["eye_or_reason"] == "missing laterality")
    assert laterality["path"].endswith("px3-fun")

    metrics = {}
    for name, path in (("dicom", dicom_folder), ("manifest", out)):
        cfg = apply_overrides(ExperimentConfig(), TINY)
        data = load_splits(path, cfg)
        assert cfg.data.oct_view == "bscans"
        metrics[name] = train_and_test(cfg, data, progress=False).test_metrics
    assert metrics["dicom"].keys() == metrics["manifest"].keys()
    for key, value in metrics["dicom"].items():  # identical, NaN (an empty bin) included
        assert value == metrics["manifest"][key] or (
            np.isnan(value) and np.isnan(metrics["manifest"][key])
        )


def test_thickness_maps_are_read_in_micrometres_and_pick_the_map_view(tiny_data, tmp_path):
    records = load_dataset(tiny_data, DataConfig(), quiet=True).records[:6]
    export_eyes(records, tmp_path, "rnflt")
    ds = load_dataset(tmp_path, DataConfig())
    assert ds.oct_view == "rnflt" and len(ds.records) == 6
    got, _ = load_arrays(ds.records[0], "rnflt")
    source = min(records, key=lambda r: abs(r.md - ds.records[0].md))
    want, _ = load_arrays(source, "rnflt")
    assert got.dtype == np.float32
    assert np.abs(got - np.clip(want, 0, None)).max() <= 0.051  # stored in 0.1 µm steps
    with pytest.raises(DataError, match="pass --oct-view rnflt"):
        load_dataset(tmp_path, DataConfig(oct_view="bscans"))


def test_a_manifest_of_2d_maps_trains_without_choosing_a_view(tiny_data, tmp_path):
    records = load_dataset(tiny_data, DataConfig(), quiet=True).records
    lines = ["eye_id,md,oct_path,fundus_path,patient_id"]
    for r in records:
        oct_map, fundus = load_arrays(r, "rnflt")
        np.save(tmp_path / f"{r.eye_id}-map.npy", oct_map)
        np.save(tmp_path / f"{r.eye_id}-fundus.npy", fundus)
        lines.append(f"{r.eye_id},{r.md},{r.eye_id}-map.npy,{r.eye_id}-fundus.npy,{r.patient_id}")
    (tmp_path / "manifest.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    done = run_in_process(
        ["remdr-train", "--data", str(tmp_path), "--out", str(run), "--quiet"]
        + [a for k, v in TINY.items() for a in ("--set", f"{k}={v}")]
    )
    assert done.returncode == 0, done.stderr
    assert "oct-view: rnflt (the OCT images are 2-D thickness maps)" in done.stderr
    assert '"oct_view": "rnflt"' in (run / "config.json").read_text()
    bad = run_in_process(
        ["remdr-train", "--data", str(tmp_path), "--oct-view", "bscans", "--quiet"]
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "oct-view=bscans expects 3-D B-scan volumes" in bad.stderr
    assert "pass --oct-view rnflt" in bad.stderr


def test_remdr_train_runs_on_a_dicom_folder_with_no_other_flag(dicom_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = run_in_process(["remdr-train", "--data", str(dicom_folder), "--quiet"])
    assert done.returncode == 0, done.stderr
    assert "150 of" in done.stderr and "2 oct-only, 1 fundus-only" in done.stderr
    assert "missing pixel data: 1" in done.stderr
    assert (tmp_path / "runs" / "train" / "metrics.json").is_file()


def test_client_check_only_prints_the_pairing(dicom_folder):
    done = subprocess.run(
        [BIN / "remdr-client", "start", "--data", str(dicom_folder), "--check-only"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "51 eyes of" in done.stdout and "(dicom)" in done.stdout
    assert "48 complete, 2 oct-only, 1 fundus-only" in done.stdout


def test_nothing_from_the_dicom_headers_leaves_the_site_in_a_round(dicom_folder):
    from flwr.app import MessageType
    from site_app import app
    from test_client_app import RUN_CONFIG, _context, _initial, _message

    initial = _initial(RUN_CONFIG)
    reply = app(
        _message(MessageType.TRAIN, initial, {"server-round": 1, "remdr-version": "0.1.0"}),
        _context(dicom_folder, RUN_CONFIG),
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert list(reply.content.array_records) == ["arrays"]
    assert set(reply.content["arrays"].keys()) == set(initial)  # model weights, nothing else
    identifiers = {r.patient_id for r in load_dataset(dicom_folder, DataConfig()).records}
    identifiers |= {"PX1", "PX2", "PX3", "PX4", "PX5", "PX6", str(dicom_folder), "Synthetic"}
    sent = []
    for records in (reply.content.metric_records, reply.content.config_records):
        for name, record in records.items():
            sent += [name, *record.keys(), *(str(v) for v in record.values())]
    assert sent and not [s for s in sent for i in identifiers if i in s]
