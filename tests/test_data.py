"""Loaders on generated files, including every kind of bad record."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from remdr.config import DataConfig
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.errors import DataError


def _copy(src: Path, dst: Path, n: int) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.npz"))[:n]:
        shutil.copy(f, dst / f.name)
    return dst


def _write(path: Path, **arrays) -> None:
    np.savez(path, **arrays)


def _good(size: int = 32, md: float = -3.0) -> dict:
    rng = np.random.default_rng(0)
    return {
        "oct_bscans": rng.integers(0, 255, (6, size, size), dtype=np.uint8),
        "slo_fundus": rng.integers(0, 255, (size, size), dtype=np.uint8),
        "md": np.float32(md),
    }


def test_harvard_flat_loads_with_demographics(tiny_data):
    ds = load_dataset(tiny_data, DataConfig(image_size=32))
    assert ds.format == "harvard-npz"
    assert len(ds.records) == 48 and ds.report.n_bad == 0
    rec = ds.records[0]
    assert isinstance(rec.demographics["race"], str)  # string race decoded, not bytes/array
    assert rec.patient_id.startswith("P") and rec.site in {"0", "1"}


def test_every_bad_record_is_skipped_and_counted(tiny_data, tmp_path):
    folder = _copy(tiny_data, tmp_path / "d", 12)
    (folder / "bad_unreadable.npz").write_bytes(b"not a zip file at all")
    good = (folder / "data_00001.npz").read_bytes()
    (folder / "bad_truncated.npz").write_bytes(good[: len(good) // 3])
    g = _good()
    _write(folder / "bad_missing_md.npz", oct_bscans=g["oct_bscans"], slo_fundus=g["slo_fundus"])
    _write(folder / "oct_only.npz", oct_bscans=g["oct_bscans"], md=g["md"])  # incomplete, valid
    _write(folder / "bad_no_image.npz", md=g["md"])
    _write(folder / "bad_shape.npz", **{**g, "oct_bscans": g["oct_bscans"][0]})
    _write(folder / "bad_dtype.npz", **{**g, "slo_fundus": np.full((32, 32), "x")})
    _write(folder / "bad_nan.npz", **{**g, "md": np.float32("nan")})
    _write(folder / "bad_inf.npz", **{**g, "md": np.float32("inf")})
    _write(folder / "bad_range.npz", **{**g, "md": np.float32(-55.0)})
    ds = load_dataset(folder, DataConfig(image_size=32))
    assert len(ds.records) == 13
    assert ds.report.n_seen == 22 and ds.report.n_bad == 9
    assert ds.report.kinds == {"complete": 12, "oct-only": 1}
    assert "12 complete, 1 oct-only, 0 fundus-only" in ds.report.summary()
    assert ds.report.skipped == {
        "unreadable file": 2,
        "missing key 'md'": 1,
        "no image (neither 'oct_bscans' nor 'slo_fundus')": 1,
        "oct has wrong shape": 1,
        "fundus has wrong dtype": 1,
        "MD not finite": 2,
        "MD outside [-40, 10] dB": 1,
    }
    assert "skipped 9" in ds.report.summary()


def test_mostly_bad_dataset_fails_with_one_line(tiny_data, tmp_path):
    folder = _copy(tiny_data, tmp_path / "d", 2)
    for i in range(3):
        (folder / f"junk{i}.npz").write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        load_dataset(folder)
    msg = str(err.value)
    assert "3 of 5 records" in msg and "unreadable file" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "kind, says", [("missing", "does not exist"), ("empty", "is empty"), ("no-data", "no eye data")]
)
def test_missing_or_empty_folder_is_a_clear_error(tmp_path, kind, says):
    path = tmp_path / "x"
    if kind != "missing":
        path.mkdir()
    if kind == "no-data":
        (path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match=says):
        load_dataset(path)


def test_shipped_splits_are_used(tiny_data, tmp_path):
    for split, n in (("train", 8), ("val", 3), ("test", 4)):
        dst = tmp_path / "h" / split
        dst.mkdir(parents=True)
        for f in sorted(tiny_data.glob("*.npz"))[:n]:
            shutil.copy(f, dst / f"{split}_{f.name}")
    ds = load_dataset(tmp_path / "h")
    assert ds.has_splits
    assert [sum(r.split == s for r in ds.records) for s in ("train", "val", "test")] == [8, 3, 4]


def test_rnflt_view_and_bscans_view_tensors(tiny_data):
    for view, shape in (("bscans", (3, 1, 24, 24)), ("rnflt", (1, 24, 24))):
        cfg = DataConfig(image_size=24, oct_view=view, n_bscans=3)
        ds = load_dataset(tiny_data, cfg)
        item = EyeDataset(ds.records[:2], cfg)[0]
        assert tuple(item["oct"].shape) == shape
        assert tuple(item["fundus"].shape) == (1, 24, 24)
        assert item["oct"].dtype == item["fundus"].dtype == item["md"].dtype
        assert np.isfinite(item["oct"].numpy()).all()


def test_harvard_gf_layout_without_fundus_loads_as_oct_only_eyes(tmp_path):
    for i in range(4):  # Harvard-GF: an RNFLT map and MD, no fundus image
        _write(tmp_path / f"data_{i}.npz", rnflt=np.ones((32, 32), np.float32), md=np.float32(-1.0))
    cfg = DataConfig()
    ds = load_dataset(tmp_path, cfg)
    assert cfg.oct_view == "rnflt" and ds.report.kinds == {"oct-only": 4}
    item = EyeDataset(ds.records, cfg)[0]
    assert item["has_oct"] and not item["has_fundus"] and not item["fundus"].any()
    with pytest.raises(DataError, match="pass --oct-view rnflt"):  # bscans: no eye has an OCT
        load_dataset(tmp_path, DataConfig(oct_view="bscans"))


def _manifest(folder: Path, rows: list[str]) -> None:
    (folder / "manifest.csv").write_text(
        "eye_id,md,oct_path,fundus_path,patient_id,site\n" + "\n".join(rows) + "\n"
    )


def test_manifest_png_jpeg_npy_and_bad_rows(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        np.save(tmp_path / f"oct{i}.npy", rng.integers(0, 255, (5, 40, 40), dtype=np.uint8))
        ext = "png" if i % 2 else "jpg"
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(
            tmp_path / f"fundus{i}.{ext}"
        )
        rows.append(f"e{i},{-i:.1f},oct{i}.npy,fundus{i}.{ext},p{i // 2},A")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    rows += [
        "e6,-1,oct0.npy,missing.png,p9,A",
        "e7,-1,oct0.npy,broken.png,p9,A",
        "e8,nan,oct0.npy,fundus0.jpg,p9,A",
    ]
    _manifest(tmp_path, rows)
    cfg = DataConfig(image_size=32, fundus_channels=3, n_bscans=2)
    ds = load_dataset(tmp_path, cfg)
    assert ds.format == "manifest" and len(ds.records) == 6
    assert ds.report.skipped == {
        "fundus file missing": 1,
        "fundus file unreadable": 1,
        "MD not finite": 1,
    }
    item = EyeDataset(ds.records, cfg)[1]
    assert tuple(item["oct"].shape) == (2, 1, 32, 32) and tuple(item["fundus"].shape) == (3, 32, 32)
    assert ds.records[2].patient_id == "p1"


def test_manifest_missing_columns_is_one_clear_error(tmp_path):
    (tmp_path / "manifest.csv").write_text("eye_id,oct_path\nx,y\n")
    with pytest.raises(DataError, match="lacks column"):
        load_dataset(tmp_path)


def test_prediction_mode_admits_unlabelled_eyes(tmp_path):
    g = _good()
    _write(tmp_path / "new.npz", oct_bscans=g["oct_bscans"], slo_fundus=g["slo_fundus"])
    ds = load_dataset(tmp_path, require_md=False)
    assert len(ds.records) == 1 and np.isnan(ds.records[0].md)


def test_an_eye_reads_the_same_the_first_time_and_every_time_after(tiny_data):
    """The in-memory cache keeps float16; the first read used to hand out the float32 decode, so
    the first epoch trained and validated on other inputs than every later one."""
    ds = load_dataset(tiny_data, DataConfig(image_size=32))
    eyes = EyeDataset(ds.records[:4], DataConfig(image_size=32), cache=True)
    first = [eyes[i] for i in range(4)]
    for i in range(4):
        again = eyes[i]
        for key in ("oct", "fundus"):
            assert torch.equal(first[i][key], again[key]), (i, key)


def test_the_generator_command_runs_clean_and_its_set_loads(tmp_path):
    # The README's `python -m remdr.data.synthetic` once warned that the module was already
    # imported by its package; a user reading that warning cannot tell whether the set is sound.
    out = tmp_path / "siteA"
    cmd = [sys.executable, "-W", "error", "-m", "remdr.data.synthetic", "--out", str(out)]
    args = [*cmd, "--n", "12", "--seed", "1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "wrote 12 eyes" in done.stdout
    assert len(load_dataset(out, DataConfig()).records) == 12
