"""Patient-level splits: seeded and severity-stratified, or keyed per patient at a site.

Both eyes of a patient always land in the same split. `split_records` (centralized training)
stratifies patients by their mean severity bin so the rare severe eyes appear in every split.
`split_by_key` (a federated site) sends each patient to validation by a keyed hash of its id
alone, so adding or removing one patient moves no other patient between train and validation:
the training set then changes by that one patient, which is the neighbouring relation the
site's privacy ledger states. It gives up stratification for that.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import defaultdict

import numpy as np

from remdr.data.records import EyeRecord
from remdr.metrics import severity_bin

SPLITS = ("train", "val", "test")


def split_records(
    records: list[EyeRecord], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, list[EyeRecord]]:
    """Use the dataset's own splits when every record has one, else split by patient."""
    if records and all(r.split for r in records):
        return {s: [r for r in records if r.split == s] for s in SPLITS}
    by_patient: dict[str, list[EyeRecord]] = defaultdict(list)
    for r in records:
        by_patient[r.patient_id].append(r)
    strata: dict[int, list[str]] = defaultdict(list)
    for pid in sorted(by_patient):
        strata[severity_bin(float(np.mean([r.md for r in by_patient[pid]])))].append(pid)
    rng = np.random.default_rng(seed)
    assigned: dict[str, list[EyeRecord]] = {s: [] for s in SPLITS}
    carry = {"val": 0.0, "test": 0.0}  # fractional remainders, so small strata still add up
    for b in sorted(strata):
        pids = list(strata[b])
        rng.shuffle(pids)
        counts = {}
        for name, frac in (("val", val_fraction), ("test", test_fraction)):
            exact = len(pids) * frac + carry[name]
            counts[name] = int(np.floor(exact))
            carry[name] = exact - counts[name]
        n_val, n_test = counts["val"], counts["test"]
        for i, pid in enumerate(pids):
            name = "val" if i < n_val else "test" if i < n_val + n_test else "train"
            assigned[name].extend(by_patient[pid])
    return assigned


def split_by_key(
    records: list[EyeRecord], val_fraction: float, key: bytes
) -> dict[str, list[EyeRecord]]:
    """Train and validation by patient: a patient validates when HMAC-SHA256(key, its id),
    read as a number in [0, 1), is below `val_fraction`. The dataset's own splits win when
    every record has one (as in `split_records`). If no patient falls below the fraction, the
    one with the lowest hash validates (with at least two patients): the training sets of two
    datasets that differ by one patient still differ by exactly one patient."""
    if records and all(r.split for r in records):
        return {s: [r for r in records if r.split == s] for s in SPLITS}
    score = {pid: _unit_hash(key, pid) for pid in patients(records)}
    val = {pid for pid, u in score.items() if u < val_fraction}
    if not val and len(score) >= 2 and val_fraction > 0:
        val = {min(score, key=score.__getitem__)}
    return {
        "train": [r for r in records if r.patient_id not in val],
        "val": [r for r in records if r.patient_id in val],
        "test": [],
    }


def site_split_key(site_id: str) -> bytes:
    """The split key of a site that keeps no secret one (a simulated site): derived from its
    name, so the same site draws the same validation patients in every run and on every
    machine, and the simulator's pooled arm can draw them too. Not secret."""
    return hashlib.sha256(f"remdr split key|{site_id}".encode()).digest()


def _unit_hash(key: bytes, patient_id: str) -> float:
    digest = hmac.new(key, patient_id.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def patients(records: list[EyeRecord]) -> set[str]:
    return {r.patient_id for r in records}
