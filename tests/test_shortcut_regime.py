"""The shortcut regime's confound and external test clinic, and the synthetic cache it lives in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from remdr.data import load_dataset
from remdr.data.splits import SPLITS, split_records
from remdr.data.synthetic import REGIMES, SyntheticSpec, ensure, generate

SPEC = SyntheticSpec(n=240, size=32, depth=2, regime="shortcut")


@pytest.fixture(scope="module")
def shortcut_eyes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shortcut")
    generate(folder, SPEC)
    rows = []
    for split in SPLITS:
        for f in sorted((folder / split).glob("data_*.npz")):
            with np.load(f) as z:
                rows.append((split, int(z["site"]), float(z["md"]), float(z["slo_fundus"].mean())))
    return folder, rows


def test_the_data_brings_its_own_split_and_the_test_eyes_are_an_external_clinic(shortcut_eyes):
    folder, rows = shortcut_eyes
    records = load_dataset(folder, quiet=True).records
    splits = split_records(records, val_fraction=0.3, test_fraction=0.3, seed=1)
    assert {s: len(v) for s, v in splits.items()} == {
        s: sum(r[0] == s for r in rows) for s in SPLITS
    }
    n = len(rows)
    assert 0.15 * n <= len(splits["test"]) <= 0.25 * n and len(splits["val"]) >= 0.08 * n
    assert {r[1] for r in rows if r[0] == "test"} == {SPEC.n_sites}  # a clinic never trained on
    assert {r[1] for r in rows if r[0] != "test"} == set(range(SPEC.n_sites))
    patients = {s: {r.patient_id for r in v} for s, v in splits.items()}
    assert not patients["train"] & patients["val"] and not patients["train"] & patients["test"]


def test_the_referral_clinic_sees_only_glaucoma_and_the_test_clinic_a_screening_mix(shortcut_eyes):
    _, rows = shortcut_eyes
    md = {k: np.array([r[2] for r in rows if r[0] != "test" and r[1] == k]) for k in range(4)}
    test_md = np.array([r[2] for r in rows if r[0] == "test"])
    assert md[0].mean() < -6 and all(md[k].mean() > -2.5 for k in (1, 2, 3))
    assert np.mean(md[0] > -2) < 0.1  # almost no normal eye at the referral clinic ...
    assert np.mean(test_md > -2) > 0.35  # ... and many at the external one


def test_the_external_clinic_has_the_referral_clinics_camera_look(shortcut_eyes):
    _, rows = shortcut_eyes
    brightness = {
        k: np.mean([r[3] for r in rows if r[0] != "test" and r[1] == k]) for k in range(4)
    }
    external = np.mean([r[3] for r in rows if r[0] == "test"])
    assert abs(external - brightness[0]) < 8
    assert all(brightness[0] - brightness[k] > 15 for k in (1, 2, 3))


def test_a_regime_is_cached_with_its_parameters_and_regenerated_when_they_change(tmp_path):
    spec = SyntheticSpec(n=12, size=16, depth=1, regime="shortcut")
    out = ensure(tmp_path / "set", spec)
    meta = json.loads((out / "synthetic.json").read_text())
    assert meta["spec"]["regime_parameters"]["camera_shift"] == REGIMES["shortcut"].camera_shift
    # a set an older version of the regime wrote: flat, other parameters
    older = dict(meta["spec"], regime_parameters={"camera_shift": 0.0})
    (out / "synthetic.json").write_text(json.dumps(dict(meta, spec=older)))
    for f in out.glob("*/data_*.npz"):
        f.rename(out / f.name)
    ensure(tmp_path / "set", spec)
    assert not list(out.glob("data_*.npz"))  # no eye of the older set is left to be read
    assert json.loads((out / "synthetic.json").read_text())["spec"] == spec.describe()
    assert len(list(out.glob("*/data_*.npz"))) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left


def test_the_default_regime_keeps_a_flat_folder_without_its_own_split(tmp_path):
    generate(tmp_path, SyntheticSpec(n=6, size=16, depth=1))
    assert len(list(tmp_path.glob("data_*.npz"))) == 6
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_a_flat_set_written_over_a_split_one_is_what_the_loader_reads(tmp_path):
    generate(tmp_path, SyntheticSpec(n=12, size=16, depth=1, regime="shortcut"))
    generate(tmp_path, SyntheticSpec(n=10, size=16, depth=1))
    assert len(load_dataset(tmp_path, quiet=True).records) == 10


def test_the_shortcut_regime_with_one_site_is_refused_in_one_line(tmp_path, capsys):
    from remdr.data.synthetic import main

    assert main(["--out", str(tmp_path), "--n-sites", "1", "--regime", "shortcut"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: the shortcut regime refers patients between sites: n_sites >= 2"]
