"""What the end-to-end tests share: waiting on a condition and checking a run directory."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from remdr.federation.run_config import split_run_config
from remdr.methods import build_model


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def initial_weights(experiment: dict) -> dict[str, torch.Tensor]:
    """The global model the ServerApp starts from (same config, same seed)."""
    cfg, _ = split_run_config(experiment)
    torch.manual_seed(cfg.train.seed)
    return build_model(cfg).state_dict()


def check_report(out: Path, rounds: int, sites: set[str]) -> dict:
    """A completed run: every round recorded once, every site trained and evaluated each round."""
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "completed"
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    assert set(report["sites"]) == sites
    for site_rows in report["sites"].values():
        assert [row["round"] for row in site_rows] == list(range(1, rounds + 1))
        assert all(row["num-examples"] > 0 and row["eval-val-mse"] is not None for row in site_rows)
    for r in range(1, rounds + 1):
        assert (out / f"round-{r:03d}.safetensors").is_file()
    assert (out / "best.safetensors").is_file() and (out / "learning_curves.png").is_file()
    return report
