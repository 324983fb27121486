"""Decoded, resized eyes kept on the site's own disk, so each federated round does not decode again.

A deployed site runs every round in a fresh process (Flower starts one per message), so an
in-memory cache dies with it. This cache file holds a dataset's preprocessed float16 tensors,
keyed by everything that shaped them: each image file's path, size and modification time, the
data config fields that change a tensor, and remdr's version. A changed file or setting gives a
new key, so a stale tensor is never read; old keys are removed when a new one is written. It
lives under `remdr.data.cache_dir()` (REMDR_CACHE), on the site's machine, beside nothing shared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from remdr import __version__
from remdr.config import DataConfig
from remdr.data import cache_dir
from remdr.data.dataset import EyeDataset

log = logging.getLogger(__name__)

SHAPING_FIELDS = ("image_size", "oct_view", "n_bscans", "fundus_channels")


def _file_stamp(path: str) -> list:
    if not path:
        return ["", 0, 0]
    st = os.stat(path)
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def cache_key(datasets: list[EyeDataset], cfg: DataConfig) -> str:
    """A digest of the files, the shaping settings and the code version behind these tensors."""
    h = hashlib.sha256()
    h.update(json.dumps([__version__, *(getattr(cfg, f) for f in SHAPING_FIELDS)]).encode())
    for ds in datasets:
        for r in ds.records:
            h.update(
                json.dumps([r.eye_id, _file_stamp(r.path), _file_stamp(r.fundus_path)]).encode()
            )
    return h.hexdigest()[:32]


def warm(datasets: list[EyeDataset], cfg: DataConfig, name: str, root: Path | None = None) -> str:
    """Fill the datasets' in-memory caches from the disk cache, preprocessing and writing it
    first when it is missing or stale. Returns "hit", "written" or "off" (too big to cache).
    `name` tells this dataset's cache file apart from other datasets' (e.g. the site's folder)."""
    if not all(ds.cache_enabled for ds in datasets) or not any(len(ds) for ds in datasets):
        return "off"
    folder = (root or cache_dir()) / "preprocessed"
    slug = hashlib.sha256(name.encode()).hexdigest()[:16]
    key = cache_key(datasets, cfg)
    path = folder / f"{slug}-{key}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            for d, ds in enumerate(datasets):
                ds.fill_cache(
                    [(tensors[f"{d}/{i}/oct"], tensors[f"{d}/{i}/fundus"]) for i in range(len(ds))]
                )
            return "hit"
        except Exception as err:  # a truncated or foreign file: rebuild it
            log.warning("preprocessed cache %s unreadable (%s); rebuilding it", path, err)
    tensors: dict[str, torch.Tensor] = {}
    for d, ds in enumerate(datasets):
        for i, (oct_x, fundus_x) in enumerate(ds.cached_tensors()):
            tensors[f"{d}/{i}/oct"], tensors[f"{d}/{i}/fundus"] = oct_x, fundus_x
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    for stale in folder.glob(f"{slug}-*.safetensors"):
        if stale != path:
            stale.unlink(missing_ok=True)
    return "written"
