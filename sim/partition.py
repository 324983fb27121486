"""Split one dataset into simulated hospital sites, with a global test set kept apart.

Partitioning is by patient (both eyes of a patient stay at one site) and uses flwr-datasets'
partitioners: `DirichletPartitioner` over MD severity bins (label skew, smaller alpha = more
skew), `ExponentialPartitioner` (quantity skew), `IidPartitioner`, and `NaturalIdPartitioner` on a
`site` field (a dataset's own site split). Each site gets a folder with the same layout a
hospital would have, so `remdr-client` could serve it unchanged.
"""

from __future__ import annotations

import dataclasses
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

SCHEMES = ("dirichlet", "iid", "quantity", "screening", "predefined")

# The `screening` scheme: the share of each severity bin's patients that the large screening
# clinic (site-0) sees; the rest go to the small specialist clinics (glaucoma services, where
# the advanced eyes are), which differ in size by a Dirichlet(1) draw. A network like this has
# quantity and label skew at once: one big, mostly normal site and small, severe-heavy ones.
SCREENING_SHARE = {"normal": 0.85, "early": 0.6, "moderate": 0.25, "severe": 0.05}


@dataclass
class PartitionSpec:
    sites: int = 4
    scheme: str = "dirichlet"  # one of SCHEMES
    alpha: float = 1.0  # Dirichlet concentration over severity bins; small = strong label skew
    test_fraction: float = 0.2  # of patients, kept apart from every site
    seed: int = 0
    # per site: "both", "oct" or "fundus" (the other modality is withheld there); () = all both
    site_modalities: tuple[str, ...] = ()
    missing_rate: float = 0.0  # at "both" sites, this fraction of eyes loses one image


SITE_MODALITIES = {"both": ("oct", "fundus"), "oct": ("oct",), "fundus": ("fundus",)}


def withhold(sites: dict[str, list[EyeRecord]], spec: PartitionSpec) -> dict[str, list[EyeRecord]]:
    """The sites' records with the modalities `spec` withholds: every eye of an "oct" or
    "fundus" site loses the other image; at "both" sites a seeded `missing_rate` of eyes loses
    one (which one: a fair coin)."""
    rng = np.random.default_rng(spec.seed + 7919)
    out: dict[str, list[EyeRecord]] = {}
    for i, (name, records) in enumerate(sites.items()):
        kind = spec.site_modalities[i] if spec.site_modalities else "both"
        kept = []
        for r in records:
            modalities = tuple(m for m in r.modalities if m in SITE_MODALITIES[kind])
            if kind == "both" and len(modalities) == 2 and rng.random() < spec.missing_rate:
                modalities = (modalities[int(rng.integers(2))],)
            if modalities:
                kept.append(dataclasses.replace(r, modalities=modalities))
        out[name] = kept
    return out


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
    elif spec.scheme == "screening":
        return _screening_sites(by_patient, table["bin"], spec)
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


def _screening_sites(
    by_patient: dict[str, list[EyeRecord]], bins: list[int], spec: PartitionSpec
) -> dict[str, list[EyeRecord]]:
    """One screening clinic (site-0) with `SCREENING_SHARE` of each bin's patients, the rest
    spread over `spec.sites - 1` specialist clinics of different sizes (half evenly, half by a
    Dirichlet(1) draw, so none is empty); seeded."""
    if spec.sites < 2:
        raise ConfigError("the screening partition with 1 site", "needs a screening clinic and "
                          "at least one specialist clinic", "use --sites 2 or more")  # fmt: skip
    rng = np.random.default_rng(spec.seed)
    k = spec.sites - 1  # half the specialists' patients spread evenly, half by a Dirichlet draw
    specialist_share = 0.5 / k + 0.5 * rng.dirichlet(np.ones(k))
    sites: dict[str, list[EyeRecord]] = {f"site-{i}": [] for i in range(spec.sites)}
    for pid, b in zip(by_patient, bins, strict=True):
        if rng.random() < SCREENING_SHARE[BINS[b]]:
            i = 0
        else:
            i = 1 + int(rng.choice(k, p=specialist_share))
        sites[f"site-{i}"].extend(by_patient[pid])
    empty = [name for name, recs in sites.items() if not recs]
    if empty:
        raise DataError(
            f"the screening partition left {', '.join(empty)} without patients",
            "too few patients for that many specialist clinics",
            "use fewer --sites or another --seed",
        )
    return sites


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


NPZ_IMAGE_KEYS = {"oct": ("oct_bscans", "rnflt"), "fundus": ("slo_fundus",)}


def _write_without(src: Path, dst: Path, absent: set[str]) -> None:
    """A copy of an npz eye without the images of the `absent` modalities (a site that lacks them)."""
    drop = {k for m in absent for k in NPZ_IMAGE_KEYS[m]}
    with np.load(src, allow_pickle=False) as z:
        np.savez(dst, **{k: z[k] for k in z.files if k not in drop})


def write_folder(records: list[EyeRecord], folder: Path) -> None:
    """Materialise records as a data folder: npz files linked in (copied without a withheld
    image), or a manifest with absolute paths (an empty cell for a withheld image)."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest_rows = []
    for r in records:
        absent = {"oct", "fundus"} - set(r.modalities)
        if r.source == "npz" and absent:
            _write_without(Path(r.path), folder / Path(r.path).name, absent)
        elif r.source == "npz":
            _link_or_copy(Path(r.path), folder / Path(r.path).name)
        else:
            oct_path = r.path if "oct" in r.modalities else ""
            fundus_path = r.fundus_path if "fundus" in r.modalities else ""
            manifest_rows.append(
                f"{r.eye_id},{r.md},{oct_path},{fundus_path},{r.patient_id},{r.site}"
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
        rows = [head + "  images (complete/OCT-only/fundus-only)"]
        for name, recs in [*self.sites.items(), ("test", self.test)]:
            c = bin_counts(recs)
            n_pat = len({r.patient_id for r in recs})
            k = Counter(r.kind for r in recs)
            rows.append(
                f"{name:10s} {len(recs):5d} {n_pat:8d} "
                + " ".join(f"{c[b]:8d}" for b in BINS)
                + f"  {k['complete']}/{k['oct-only']}/{k['fundus-only']}"
            )
        return "\n".join(rows)

    def summary(self) -> dict:
        return {
            "spec": asdict(self.spec),
            "sites": {
                n: {
                    "eyes": len(r),
                    "kinds": dict(Counter(x.kind for x in r)),
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
    sites = withhold(assign_sites(pool, spec), spec)
    if root.exists():
        shutil.rmtree(root / "sites", ignore_errors=True)
        shutil.rmtree(root / "test", ignore_errors=True)
    result = Partition(root, sites, parts["test"], spec)
    for name, recs in sites.items():
        write_folder(recs, result.site_dir(name))
    write_folder(result.test, result.test_dir)
    (root / "partition.json").write_text(json.dumps(result.summary(), indent=2))
    return result
