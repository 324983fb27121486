"""Patient-level, seeded, severity-stratified splits.

Both eyes of a patient always land in the same split; patients are stratified by their mean
severity bin so the rare severe eyes appear in every split.
"""

from __future__ import annotations

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


def patients(records: list[EyeRecord]) -> set[str]:
    return {r.patient_id for r in records}
