"""Image encoders: any timm model, random init or a local weights file (never a model hub)."""

from __future__ import annotations

import difflib
from pathlib import Path

import timm
import torch
from torch import nn

from remdr.config import ENCODER_NAMES
from remdr.errors import ConfigError


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle code
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _load_local_weights(model: nn.Module, path: Path, in_chans: int) -> None:
    """Load a local checkpoint, adapting the first conv to `in_chans` and dropping the classifier."""
    state = _read_weights(path)
    first_conv = model.pretrained_cfg.get("first_conv")
    own = model.state_dict()
    if first_conv and f"{first_conv}.weight" in state:
        key = f"{first_conv}.weight"
        if state[key].shape[1] != in_chans:
            state[key] = timm.models.adapt_input_conv(in_chans, state[key])
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(
            f"weights file {path} matches no parameter of the encoder",
            "it was saved for a different architecture",
            "pass weights of the same timm model name",
        )
    model.load_state_dict(usable, strict=False)


def create_encoder(name: str, in_chans: int, weights: str = "") -> nn.Module:
    """A timm backbone without classifier (`num_classes=0`); its width is `.num_features`."""
    if name not in ENCODER_NAMES:
        close = difflib.get_close_matches(name, ENCODER_NAMES, n=3)
        raise ConfigError(
            f"unknown encoder '{name}'",
            ("did you mean " + ", ".join(close)) if close else "not a timm model name",
            "see timm.list_models()",
        )
    if weights and not Path(weights).is_file():
        raise ConfigError(
            f"weights file {weights} not found", "", "give a local .safetensors/.pth path"
        )
    model = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    if weights:
        _load_local_weights(model, Path(weights), in_chans)
    return model
