"""The commands as a user runs them: files written, one-line errors, no tracebacks."""

from __future__ import annotations

import json

from conftest import TINY_CLI_FLAGS

from remdr.cli import predict as predict_cli
from remdr.cli import train as train_cli

TINY_FLAGS = TINY_CLI_FLAGS


def test_train_then_predict(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        train_cli.main(
            ["--data", str(tiny_data), "--method", "concat", "--out", str(run), *TINY_FLAGS]
        )
        == 0
    )
    for name in (
        "model.safetensors",
        "config.json",
        "metrics.json",
        "predictions.csv",
        "pred_vs_true.png",
    ):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["n"] > 0 and "mae_severe" in metrics["test"]
    assert "test MSE" in capsys.readouterr().out
    preds = tmp_path / "preds.csv"
    assert (
        predict_cli.main(
            ["--model", str(run), "--data", str(tiny_data), "--out", str(preds), "--device", "cpu"]
        )
        == 0
    )
    lines = preds.read_text().splitlines()
    assert lines[0] == "eye_id,patient_id,md_pred,md,input" and len(lines) == 49
    assert all(line.endswith(",complete") for line in lines[1:])


def test_synthetic_default_path(tmp_path):
    run = tmp_path / "run"
    args = [
        "--synthetic",
        "--synthetic-n",
        "40",
        "--method",
        "fundus",
        "--out",
        str(run),
        *TINY_FLAGS,
    ]
    assert train_cli.main(args) == 0
    assert (run / "model.safetensors").is_file()


def test_list_methods(capsys):
    assert train_cli.main(["--list-methods"]) == 0
    assert "remdr_no_sagm" in capsys.readouterr().out
