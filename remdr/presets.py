"""Named sets of config values for a kind of machine (`--preset`, `preset =` in a federation's
run config); any key given explicitly wins over the preset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from remdr.config import ExperimentConfig, apply_overrides
from remdr.errors import ConfigError


@dataclass(frozen=True)
class Preset:
    """A named set of config values for a kind of machine; explicit flags and keys override it."""

    summary: str
    values: dict[str, Any]


PRESETS = {
    "cpu": Preset("the defaults: tiny encoders at 64 px, 4 B-scans (a 2-core CPU)", {}),
    # a GPU site: the encoders and input sizes of the method papers. bf16 autocast, channels-last
    # and pinned memory are on whenever the device is CUDA (remdr.runtime), for any preset.
    "paper": Preset(
        "a GPU site: resnet18 encoders at 224 px, 8 B-scans, 256-wide embeddings, 4 loader "
        "workers (bf16 on CUDA)",
        {
            "oct-encoder": "resnet18",
            "fundus-encoder": "resnet18",
            "image-size": 224,
            "n-bscans": 8,
            "embed-dim": 256,
            "fusion-hidden": 256,
            "num-workers": 4,
        },
    ),
}


def apply_preset(cfg: ExperimentConfig, name: str) -> ExperimentConfig:
    """`cfg` with the preset's values; an unknown name is a ConfigError naming the presets."""
    if name not in PRESETS:
        raise ConfigError(
            f"preset {name!r}",
            "no such preset",
            "one of " + ", ".join(f"{k} ({v.summary})" for k, v in PRESETS.items()),
        )
    return apply_overrides(cfg, PRESETS[name].values)
