"""The model really learns from the images, and a saved run predicts exactly as it did in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from remdr.checkpoint import load_run, save_run
from remdr.config import ExperimentConfig, apply_overrides
from remdr.data.synthetic import SyntheticSpec, generate
from remdr.experiment import load_splits, train_and_test
from remdr.train import make_loader, predict


@pytest.fixture(scope="module")
def learn_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn")
    generate(out, SyntheticSpec(n=600, size=32, depth=6, seed=2))
    return out


def test_the_default_method_learns_well_below_md_variance(learn_data):
    """The training defaults (remdr, 24 epochs) at test size. Measured on a 2-core CPU: test MSE
    0.16 x the MD variance and Pearson 0.92 (the old defaults, concat for 8 epochs: 0.26 and
    0.88); the bounds leave about 2x room so a change of platform does not fail it."""
    cfg = apply_overrides(ExperimentConfig(), {"image-size": 32, "n-bscans": 2, "device": "cpu"})
    assert (cfg.train.method, cfg.train.epochs) == ("remdr", 24)
    out = train_and_test(cfg, load_splits(learn_data, cfg), progress=False)
    m = out.test_metrics
    # Predicting the mean gives MSE = variance.
    assert m["mse"] <= 0.3 * m["md_var"], (
        f"test MSE {m['mse']:.2f} vs MD variance {m['md_var']:.2f}"
    )
    assert m["pearson"] > 0.85


def test_checkpoint_round_trip_gives_identical_predictions(tiny_data, tiny_cfg, tmp_path):
    cfg = apply_overrides(tiny_cfg, {"method": "remdr"})
    data = load_splits(tiny_data, cfg)
    out = train_and_test(cfg, data, progress=False)
    save_run(tmp_path / "run", out.model, cfg)
    model, cfg2 = load_run(tmp_path / "run")
    assert cfg2 == cfg
    loader = make_loader(data.test, 8, shuffle=False, seed=0, device=torch.device("cpu"))
    a = predict(out.model, loader, torch.device("cpu"))["pred"]
    b = predict(model, loader, torch.device("cpu"))["pred"]
    np.testing.assert_array_equal(a, b)


def test_training_is_deterministic_on_cpu(tiny_data, tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"method": "concat"})
    runs = [
        train_and_test(cfg, load_splits(tiny_data, cfg), progress=False).test_preds["pred"]
        for _ in range(2)
    ]
    np.testing.assert_array_equal(runs[0], runs[1])


@pytest.mark.slow  # 30 DP epochs on 600 eyes; the fast tier's learning check is the one above
def test_dp_training_still_learns_at_epsilon_8(learn_data, tmp_path):
    """remdr_dp at (8, 1e-5)-DP per patient, with the recipe DP needs: large batches (q ~ 0.5),
    many epochs, a constant learning rate. Its sampling and noise come from OS entropy, so each
    run differs: 0.46-0.86 x the variance and Pearson 0.69-0.82 over 13 runs measured since
    (one CI-like run at 0.857 failed the earlier bound of 0.85); not learning would be 1 x the
    variance with Pearson near 0, so the Pearson bound carries the test."""
    cfg = apply_overrides(
        ExperimentConfig(),
        {
            "image-size": 32, "oct-view": "rnflt", "embed-dim": 16, "fusion-hidden": 16,
            "epochs": 30, "batch-size": 128, "lr": 3e-3, "schedule": "constant",
            "device": "cpu", "method": "remdr_dp", "dp-target-epsilon": 8.0,
            "dp-ledger": str(tmp_path / "ledger.jsonl"),
        },
    )  # fmt: skip
    out = train_and_test(cfg, load_splits(learn_data, cfg), progress=False)
    m = out.test_metrics
    assert out.fit.privacy["epsilon_cumulative"] == pytest.approx(8.0, abs=0.05)
    assert m["mse"] <= 0.95 * m["md_var"], f"test MSE {m['mse']:.2f} vs variance {m['md_var']:.2f}"
    assert m["pearson"] > 0.55
