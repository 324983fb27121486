"""Run directories: weights as safetensors, the full config tree and version as JSON."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from remdr import __version__
from remdr.config import ExperimentConfig
from remdr.errors import ConfigError
from remdr.methods import build_model, create_method
from remdr.model import ReM3Dr

WEIGHTS, CONFIG = "model.safetensors", "config.json"


def state_to_cpu(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors-ready copy: contiguous CPU tensors (channels-last ones included)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_run(
    out: Path, model: ReM3Dr, cfg: ExperimentConfig, extra: dict[str, Any] | None = None
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_to_cpu(model), str(out / WEIGHTS), metadata={"remdr_version": __version__})
    meta = {
        "remdr_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "modalities": list(model.modalities),
        "config": cfg.to_dict(),
        **(extra or {}),
    }
    (out / CONFIG).write_text(json.dumps(meta, indent=2))


def load_run(
    run_dir: Path | str, device: torch.device | str = "cpu"
) -> tuple[ReM3Dr, ExperimentConfig]:
    """Rebuild the model of a run directory and load its weights."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file() or not (run_dir / WEIGHTS).is_file():
        raise ConfigError(
            f"{run_dir} is not a remdr run directory",
            f"it needs {CONFIG} and {WEIGHTS}",
            "pass the --out folder of remdr-train",
        )
    try:
        meta = json.loads((run_dir / CONFIG).read_text())
        for key in ("oct_weights", "fundus_weights"):  # initial weights: the trained ones follow
            meta["config"].get("model", {})[key] = ""
        cfg = ExperimentConfig.from_dict(meta["config"])
    except (json.JSONDecodeError, KeyError) as err:
        raise ConfigError(f"{run_dir / CONFIG} is damaged", str(err)) from None
    method = create_method(cfg.train.method, cfg.method)
    model = build_model(cfg, method)
    missing, unexpected = model.load_state_dict(load_file(str(run_dir / WEIGHTS)), strict=False)
    # a run saved before absent-modality embeddings existed predicts complete eyes as it did
    missing = [k for k in missing if not k.startswith("absent.")]
    if missing or unexpected:
        raise ConfigError(
            f"{run_dir / WEIGHTS} does not match its config",
            f"{len(missing)} missing and {len(unexpected)} unexpected tensors",
        )
    return model.to(device).eval(), cfg
