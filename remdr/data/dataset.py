"""Torch dataset: records -> normalised tensors of the chosen OCT view and the fundus image."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset as TorchDataset

from remdr.config import DataConfig
from remdr.data.loading import load_arrays
from remdr.data.records import EyeRecord

RNFLT_SCALE_UM = 200.0  # µm mapped to 1.0; thickness maps are floats in µm
PIXEL_MEAN, PIXEL_STD = 0.5, 0.25  # fixed, so no statistic of private images is ever computed
CACHE_LIMIT_BYTES = 2 * 1024**3


def _to_unit(arr: np.ndarray) -> np.ndarray:
    """Scale raw values to about [0, 1]: 8-bit and 16-bit images by their range, µm maps by 200."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 255.0
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) / 65535.0
    return arr.astype(np.float32) / RNFLT_SCALE_UM


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def bscan_indices(depth: int, k: int) -> np.ndarray:
    """K evenly spaced slice indices, away from the volume's edges."""
    return np.linspace(0, depth - 1, k + 2)[1:-1].round().astype(int)


def preprocess_oct(arr: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """bscans: (D, H, W) -> (K, 1, S, S); rnflt: (H, W) -> (1, S, S)."""
    if cfg.tensor_view == "bscans":
        vol = _to_unit(arr[bscan_indices(arr.shape[0], cfg.n_bscans)])
        x = _resize(torch.from_numpy(vol)[:, None], cfg.image_size)
    else:
        x = _resize(torch.from_numpy(_to_unit(arr))[None, None], cfg.image_size)[0]
    return (x - PIXEL_MEAN) / PIXEL_STD


def preprocess_fundus(arr: np.ndarray, cfg: DataConfig) -> torch.Tensor:
    """(H, W) or (H, W, C) -> (fundus_channels, S, S)."""
    img = _to_unit(arr)
    if img.ndim == 3:
        img = img[..., :3].mean(-1) if cfg.fundus_channels == 1 else img[..., :3]
    x = torch.from_numpy(np.ascontiguousarray(img))
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    if x.shape[0] != cfg.fundus_channels:
        x = x.expand(cfg.fundus_channels, -1, -1)
    x = _resize(x[None], cfg.image_size)[0]
    return (x - PIXEL_MEAN) / PIXEL_STD


class EyeDataset(TorchDataset):
    """Items are dicts: ``oct`` (K,1,S,S) or (1,S,S), ``fundus`` (C,S,S), ``md`` (dB), ``index``,
    and ``has_oct`` / ``has_fundus`` (bool): an absent image is zeros and its flag false.

    Preprocessed tensors are cached in memory as float16 when the whole set fits in 2 GiB,
    which makes CPU epochs after the first cheap.
    """

    def __init__(self, records: list[EyeRecord], cfg: DataConfig, cache: bool | None = None):
        self.records, self.cfg = records, cfg
        k = cfg.n_bscans if cfg.tensor_view == "bscans" else 1
        per_item = 2 * cfg.image_size**2 * (k + cfg.fundus_channels)
        self.cache_enabled = (
            cache if cache is not None else per_item * len(records) < CACHE_LIMIT_BYTES
        )
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self.records)

    def _tensors(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i in self._cache:
            oct_x, fundus_x = self._cache[i]
            return oct_x.float(), fundus_x.float()
        oct_arr, fundus_arr = load_arrays(self.records[i], self.cfg.tensor_view)
        oct_x = preprocess_oct(oct_arr, self.cfg) if oct_arr is not None else self._blank("oct")
        fundus_x = (
            preprocess_fundus(fundus_arr, self.cfg)
            if fundus_arr is not None
            else self._blank("fundus")
        )
        if self.cache_enabled:  # the first read sees what every later read will: float16's values
            self._cache[i] = (oct_x.half(), fundus_x.half())
            return self._cache[i][0].float(), self._cache[i][1].float()
        return oct_x, fundus_x

    def _blank(self, modality: str) -> torch.Tensor:
        """The zeros standing in for an absent image (never seen by a branch: it is masked)."""
        s = self.cfg.image_size
        if modality == "fundus":
            return torch.zeros(self.cfg.fundus_channels, s, s)
        if self.cfg.tensor_view == "bscans":
            return torch.zeros(self.cfg.n_bscans, 1, s, s)
        return torch.zeros(1, s, s)

    def cached_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every item's (oct, fundus) as cached (float16), decoding what is not cached yet."""
        for i in range(len(self)):
            if i not in self._cache:
                self._tensors(i)
        return [self._cache[i] for i in range(len(self))]

    def fill_cache(self, items: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Take every item's (oct, fundus) from `cached_tensors()` of an earlier run."""
        self._cache = dict(enumerate(items))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        oct_x, fundus_x = self._tensors(i)
        return {
            "oct": oct_x,
            "fundus": fundus_x,
            "md": torch.tensor(self.records[i].md, dtype=torch.float32),
            "index": torch.tensor(i),
            "has_oct": torch.tensor("oct" in self.records[i].modalities),
            "has_fundus": torch.tensor("fundus" in self.records[i].modalities),
        }

    def targets(self) -> np.ndarray:
        return np.array([r.md for r in self.records], dtype=np.float32)
