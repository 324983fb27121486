"""Data layer: loaders (Harvard npz, manifest.csv), validation, splits, tensors, synthetic data."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from remdr.data.loading import Dataset, detect_format, load_dataset
from remdr.data.records import EyeRecord, LoadReport

if TYPE_CHECKING:
    from remdr.data.synthetic import SyntheticSpec


def cache_dir() -> Path:
    return Path(os.environ.get("REMDR_CACHE", Path.home() / ".cache" / "remdr"))


def synthetic_data(spec: SyntheticSpec | None = None) -> Path:
    """The embedded default dataset: generated once per spec into the cache, then reused."""
    from remdr.data.synthetic import SyntheticSpec, ensure

    spec = spec or SyntheticSpec()
    name = f"synthetic-n{spec.n}-s{spec.size}-d{spec.depth}-sites{spec.n_sites}-seed{spec.seed}"
    if spec.regime != "default":  # the default's folder name is unchanged (caches depend on it)
        name += f"-{spec.regime}"
    return ensure(cache_dir() / name, spec)


def __getattr__(name: str):
    # The generator loads on first use, so `python -m remdr.data.synthetic` runs it fresh
    # (imported eagerly here, runpy warned that the module was already loaded).
    if name == "SyntheticSpec":
        from remdr.data.synthetic import SyntheticSpec

        return SyntheticSpec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Dataset",
    "EyeRecord",
    "LoadReport",
    "SyntheticSpec",
    "detect_format",
    "load_dataset",
    "synthetic_data",
]
