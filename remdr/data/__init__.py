"""Data layer: loaders (Harvard npz, manifest.csv), validation, splits, tensors, synthetic data."""

from __future__ import annotations

import os
from pathlib import Path

from remdr.data.loading import Dataset, detect_format, load_dataset
from remdr.data.records import EyeRecord, LoadReport
from remdr.data.synthetic import SyntheticSpec, ensure


def cache_dir() -> Path:
    return Path(os.environ.get("REMDR_CACHE", Path.home() / ".cache" / "remdr"))


def synthetic_data(spec: SyntheticSpec | None = None) -> Path:
    """The embedded default dataset: generated once per spec into the cache, then reused."""
    spec = spec or SyntheticSpec()
    name = f"synthetic-n{spec.n}-s{spec.size}-d{spec.depth}-sites{spec.n_sites}-seed{spec.seed}"
    if spec.regime != "default":  # the default's folder name is unchanged (caches depend on it)
        name += f"-{spec.regime}"
    return ensure(cache_dir() / name, spec)


__all__ = [
    "Dataset",
    "EyeRecord",
    "LoadReport",
    "SyntheticSpec",
    "detect_format",
    "load_dataset",
    "synthetic_data",
]
