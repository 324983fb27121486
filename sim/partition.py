"""Split one dataset into simulated hospital sites, with a global test set kept apart.

Partitioning is by patient (both eyes of a patient stay at one site) and uses flwr-datasets'
partitioners: `DirichletPartitioner` over MD severity bins (label skew, smaller alpha = more
skew), `ExponentialPartitioner` (quantity skew), `IidPartitioner`, and `NaturalIdPartitioner` on a
`site` field (a dataset's own site split). Each site gets a folder with the same layout a
hospital would have, so `remdr-client` could serve it unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from remdr.data.loading import Dataset
from remdr.data.records import EyeRecord
from remdr.data.splits import split_records
from remdr.errors import ConfigError, DataError
from remdr.metrics import BINS, severity_bin

SCHEMES = ("dirichlet", "iid", "quantity", "predefined")


@dataclass
class PartitionSpec:
    sites: int = 4
    scheme: str = "dirichlet"  # one of SCHEMES
    alpha: float = 1.0  # Dirichlet concentration over severity bins; small = strong label skew
    test_fraction: float = 0.2  # of patients, kept apart from every site
    seed: int = 0


def _patients(records: list[EyeRecord]) -> dict[str, list[EyeRecord]]:
    by: dict[str, list[EyeRecord]] = defaultdict(list)
    for r in records:
        by[r.patient_id].append(r)
    return dict(sorted(by.items()))


def assign_sites(records: list[EyeRecord], spec: PartitionSpec) -> dict[str, list[EyeRecord]]:
    """Site name -> records, by patient, with flwr-datasets' partitioners."""
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        ExponentialPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    if spec.scheme not in SCHEMES:
        raise ConfigError(
            f"partition scheme {spec.scheme!r}", f"must be one of {', '.join(SCHEMES)}"
        )
    by_patient = _patients(records)
    pids = list(by_patient)
    if len(pids) < spec.sites * 2:
        raise DataError(
            f"{len(pids)} patients cannot fill {spec.sites} sites", "need at least 2 per site"
        )
    table = {
        "patient": pids,
        "bin": [severity_bin(float(np.mean([r.md for r in by_patient[p]]))) for p in pids],
        "site": [by_patient[p][0].site or "unknown" for p in pids],
    }
    if spec.scheme == "dirichlet":
        min_size = max(1, min(10, len(pids) // (3 * spec.sites)))
        part = DirichletPartitioner(
            spec.sites,
            "bin",
            spec.alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=spec.seed,
        )
    elif spec.scheme == "quantity":
        part = ExponentialPartitioner(spec.sites)
    elif spec.scheme == "iid":
        part = IidPartitioner(spec.sites)
    else:
        if len(set(table["site"])) < 2:
            raise DataError(
                "no predefined sites", "records carry no `site` field (or only one value)"
            )
        part = NaturalIdPartitioner(partition_by="site")
    hf = HFDataset.from_dict(table)
    if spec.scheme in ("iid", "quantity"):  # these partitioners cut in order: shuffle first
        hf = hf.shuffle(seed=spec.seed)
    part.dataset = hf
    sites: dict[str, list[EyeRecord]] = {}
    for k in range(part.num_partitions):
        chunk = part.load_partition(k)
        name = f"site-{k}"
        sites[name] = [r for p in chunk["patient"] for r in by_patient[p]]
    return sites


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_folder(records: list[EyeRecord], folder: Path) -> None:
    """Materialise records as a data folder: npz files linked in, or a manifest with absolute paths."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest_rows = []
    for r in records:
        if r.source == "npz":
            _link_or_copy(Path(r.path), folder / Path(r.path).name)
        else:
            manifest_rows.append(
                f"{r.eye_id},{r.md},{r.path},{r.fundus_path},{r.patient_id},{r.site}"
            )
    if manifest_rows:
        header = "eye_id,md,oct_path,fundus_path,patient_id,site"
        (folder / "manifest.csv").write_text("\n".join([header, *manifest_rows]) + "\n")


def bin_counts(records: list[EyeRecord]) -> dict[str, int]:
    counts = Counter(severity_bin(r.md) for r in records)
    return {name: counts.get(i, 0) for i, name in enumerate(BINS)}


@dataclass
class Partition:
    root: Path
    sites: dict[str, list[EyeRecord]]
    test: list[EyeRecord]
    spec: PartitionSpec

    def site_dir(self, name: str) -> Path:
        return self.root / "sites" / name

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    def table(self) -> str:
        head = f"{'site':10s} {'eyes':>5s} {'patients':>8s} " + " ".join(f"{b:>8s}" for b in BINS)
        rows = [head]
        for name, recs in [*self.sites.items(), ("test", self.test)]:
            c = bin_counts(recs)
            n_pat = len({r.patient_id for r in recs})
            rows.append(
                f"{name:10s} {len(recs):5d} {n_pat:8d} " + " ".join(f"{c[b]:8d}" for b in BINS)
            )
        return "\n".join(rows)

    def summary(self) -> dict:
        return {
            "spec": asdict(self.spec),
            "sites": {
                n: {
                    "eyes": len(r),
                    "patients": len({x.patient_id for x in r}),
                    "bins": bin_counts(r),
                    "eye_ids": [x.eye_id for x in r],
                }
                for n, r in self.sites.items()
            },
            "test": {
                "eyes": len(self.test),
                "bins": bin_counts(self.test),
                "eye_ids": [x.eye_id for x in self.test],
            },
        }


def partition(dataset: Dataset, spec: PartitionSpec, root: Path) -> Partition:
    """Keep a patient-level global test set apart, split the rest into sites, write folders."""
    parts = split_records(dataset.records, 0.0, spec.test_fraction, spec.seed)
    pool = parts["train"] + parts["val"]
    sites = assign_sites(pool, spec)
    if root.exists():
        shutil.rmtree(root / "sites", ignore_errors=True)
        shutil.rmtree(root / "test", ignore_errors=True)
    result = Partition(root, sites, parts["test"], spec)
    for name, recs in sites.items():
        write_folder(recs, result.site_dir(name))
    write_folder(result.test, result.test_dir)
    (root / "partition.json").write_text(json.dumps(result.summary(), indent=2))
    return result
