"""Presets: the GPU production preset trains end to end (here on CPU at tiny sizes), explicit
flags win over it, and a federation's run config can name it."""

from __future__ import annotations

import json

import pytest

from remdr.cli import predict as predict_cli
from remdr.cli import train as train_cli
from remdr.config import ExperimentConfig
from remdr.errors import ConfigError
from remdr.federation.run_config import split_run_config
from remdr.presets import PRESETS, apply_preset


def test_paper_preset_trains_and_predicts_with_real_resnet18_encoders(tiny_data, tmp_path):
    run = tmp_path / "run"
    # the preset's backbones at a CPU size: explicit keys win over the preset's 224 px and 8 scans
    args = ["--data", str(tiny_data), "--preset", "paper", "--epochs", "1", "--image-size", "32",
            "--set", "n-bscans=2", "--set", "num-workers=0", "--device", "cpu", "--quiet",
            "--out", str(run)]  # fmt: skip
    assert train_cli.main(args) == 0
    cfg = json.loads((run / "config.json").read_text())["config"]
    assert cfg["model"]["oct_encoder"] == cfg["model"]["fundus_encoder"] == "resnet18"
    assert cfg["model"]["embed_dim"] == 256 and cfg["data"]["image_size"] == 32
    assert cfg["data"]["n_bscans"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] > 0
    preds = tmp_path / "preds.csv"
    assert predict_cli.main(["--model", str(run), "--data", str(tiny_data), "--out", str(preds),
                             "--device", "cpu"]) == 0  # fmt: skip
    assert len(preds.read_text().splitlines()) == 49


def test_paper_preset_is_the_production_size():
    cfg = apply_preset(ExperimentConfig(), "paper")
    assert cfg.data.image_size >= 224 and cfg.data.n_bscans >= 8
    assert (
        cfg.model.oct_encoder == "resnet18" and cfg.train.method == ExperimentConfig().train.method
    )
    assert apply_preset(ExperimentConfig(), "cpu") == ExperimentConfig()


def test_unknown_preset_is_one_line(tmp_path, capsys):
    assert train_cli.main(["--preset", "gpu-huge", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(name in err for name in PRESETS)
    with pytest.raises(ConfigError, match="preset"):
        apply_preset(ExperimentConfig(), "gpu-huge")


def test_a_federation_names_the_preset_in_its_run_config():
    cfg, fed = split_run_config({"preset": "paper", "image-size": 96})
    assert fed.preset == "paper" and cfg.model.oct_encoder == "resnet18"
    assert cfg.data.image_size == 96  # a key of the run config wins over the preset
    assert cfg.privacy.group_norm  # the federated defaults still hold
    with pytest.raises(ConfigError, match="preset"):
        split_run_config({"preset": "gpu-huge"})
