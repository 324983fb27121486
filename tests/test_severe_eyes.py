"""Known answers of the severe-eye options (Balanced MSE, ConR, RankSim, the head gate) and of
the synthetic regimes."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from remdr.config import SYNTHETIC_REGIMES, ExperimentConfig, apply_overrides
from remdr.data import SyntheticSpec, synthetic_data
from remdr.data.synthetic import REGIMES, generate
from remdr.errors import ConfigError
from remdr.methods import build_model, create_method
from remdr.regression_losses import bmc_loss, conr_loss, ranksim_loss

# -- Balanced MSE --------------------------------------------------------------------------------


def test_bmc_two_eyes_by_hand():
    """pred (0, 2), labels (0, 1), sigma 1: row 0 logits (0, -1/2), row 1 (-2, -1/2)."""
    pred, y = torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0])
    ce0 = -math.log(1 / (1 + math.exp(-0.5)))
    ce1 = -math.log(math.exp(-0.5) / (math.exp(-2.0) + math.exp(-0.5)))
    assert float(bmc_loss(pred, y, 1.0)) == pytest.approx(2.0 * (ce0 + ce1) / 2)
    assert float(bmc_loss(torch.tensor([3.0]), torch.tensor([-1.0]), 1.0)) == 0.0


def test_bmc_pulls_a_rare_eye_away_from_the_frequent_labels():
    """A rare eye predicted between its label and the crowd is pushed further from the crowd
    than MSE pushes it (the gradient includes the repulsion of the batch's other labels)."""
    y = torch.tensor([0.0, 0.0, 0.0, 0.0, -3.0])
    pred = torch.tensor([0.0, 0.0, 0.0, 0.0, -2.0], requires_grad=True)
    bmc_loss(pred, y, 1.0).backward()
    mse_grad = 2 * (-2.0 + 3.0) / 5
    assert pred.grad[4] > mse_grad > 0


# -- ConR ----------------------------------------------------------------------------------------


def _conr_reference(z, y, p, omega, tau, push, a):
    u = torch.nn.functional.normalize(z, dim=-1)
    losses = []
    for i in range(len(y)):
        pos = [j for j in range(len(y)) if j != i and abs(y[i] - y[j]) <= omega]
        neg = [k for k in range(len(y)) if abs(y[i] - y[k]) > omega and abs(p[i] - p[k]) <= omega]
        if not pos or not neg:
            losses.append(torch.tensor(0.0))
            continue
        s = u[i] @ u.T / tau
        denom = sum(torch.exp(s[j]) for j in pos) + sum(
            a[i] * math.exp(push * abs(y[i] - y[k])) * torch.exp(s[k]) for k in neg
        )
        losses.append(-sum(torch.log(torch.exp(s[j]) / denom) for j in pos) / len(pos))
    return torch.stack(losses).mean()


def test_conr_matches_the_anchor_by_anchor_definition():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(10, 6, generator=g)
    y = torch.tensor([0.0, 0.3, -0.5, -8.0, -8.4, -20.0, -1.0, 0.5, -20.5, -2.0])
    p = torch.tensor([0.0, 0.2, -0.4, -1.0, -0.6, -3.0, -0.8, 0.4, -2.5, -1.5])  # severe eyes
    a = torch.rand(10, generator=g) + 0.5  # collide with mild predictions
    got = conr_loss(z, y, p, omega=1.0, tau=0.2, anchor_weights=a, push=0.01)
    ref = _conr_reference(z, y, p, 1.0, 0.2, 0.01, a)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert got > 0


def test_conr_is_zero_without_collisions():
    """Predictions as far apart as the labels: no negatives, nothing to push."""
    z = torch.randn(6, 4)
    y = torch.tensor([0.0, 0.1, -10.0, -10.2, -20.0, -20.1])
    assert float(conr_loss(z, y, y.clone(), omega=1.0, tau=0.2)) == 0.0


# -- RankSim -------------------------------------------------------------------------------------


def test_ranksim_is_zero_when_similarities_rank_like_labels():
    """Embeddings on a line by label: cosine similarity falls with label distance."""
    y = torch.tensor([0.0, -1.0, -3.0, -7.0, -12.0])  # no two label distances tie in a row
    angles = -y / 14.0
    z = torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    assert float(ranksim_loss(z, y, 2.0)) == 0.0


def test_ranksim_gradient_repairs_a_swapped_order():
    y = torch.tensor([0.0, -1.0, -3.0, -6.0, -10.0])
    angles = torch.tensor([0.0, 0.25, 0.08, 0.5, 0.83])  # eyes 1 and 2 swapped
    z = torch.stack([torch.cos(angles), torch.sin(angles)], -1).requires_grad_(True)
    loss = ranksim_loss(z, y, 2.0)
    assert loss > 0
    loss.backward()
    with torch.no_grad():
        better = ranksim_loss(z - 0.05 * z.grad / z.grad.norm(), y, 2.0)
    assert better < loss


# -- the gate over fused and unimodal heads ------------------------------------------------------


def test_head_gate_starts_uniform_and_can_hand_an_eye_to_one_head(tiny_cfg):
    cfg = apply_overrides(tiny_cfg, {"head-gate": True, "dropout": 0.0})
    model = build_model(cfg, create_method("concat", cfg.method)).eval()
    x_o = torch.rand(3, cfg.data.n_bscans, 1, cfg.data.image_size, cfg.data.image_size)
    x_f = torch.rand(3, 1, cfg.data.image_size, cfg.data.image_size)
    with torch.no_grad():
        out = model(x_o, x_f)
        raw = model.fusion(out["z"]).squeeze(-1)
        torch.testing.assert_close(out["gate"], torch.full((3, 3), 1 / 3))
        torch.testing.assert_close(out["pred"], (raw + out["pred_oct"] + out["pred_fundus"]) / 3)
        model.gate.bias.copy_(torch.tensor([-50.0, -50.0, 50.0]))  # all to the fundus head
        out = model(x_o, x_f)
        torch.testing.assert_close(out["pred"], out["pred_fundus"])
        model.gate.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))  # OCT head, but no OCT image:
        present = {"oct": torch.tensor([True, False, True]), "fundus": torch.ones(3, dtype=bool)}
        model.train()
        out = model(x_o, x_f, present=present)
        assert out["gate"][1, 1] == 0 and out["gate"][0, 1] == pytest.approx(1.0)


def test_gate_off_leaves_the_model_unchanged(tiny_cfg):
    names = {n for n, _ in build_model(tiny_cfg).named_parameters()}
    assert not any(n.startswith("gate") for n in names)


# -- options a method cannot take ----------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value", [("fused-loss", "bmc"), ("conr-weight", 1.0), ("ranksim-weight", 1.0)]
)
def test_private_methods_refuse_row_coupling_losses(key, value):
    cfg = apply_overrides(ExperimentConfig(), {key: value})
    with pytest.raises(ConfigError, match="private method"):
        create_method("concat_dp", cfg.method)


def test_ensemble_weight_between_minus_one_and_zero_is_refused():
    with pytest.raises(ConfigError, match="ensemble-oct-weight"):
        apply_overrides(ExperimentConfig(), {"ensemble-oct-weight": -0.5})
    apply_overrides(ExperimentConfig(), {"ensemble-oct-weight": -1})


# -- synthetic regimes ---------------------------------------------------------------------------

# sha256 of the arrays and metadata of SyntheticSpec(n=30, size=32, depth=6, n_sites=3, seed=5),
# taken before regimes existed: the default regime is unchanged, bit for bit
DEFAULT_DIGEST = "093e107ea062b2a2e67582485ee093c4308915384ad27d64cb155e8b3279b857"


def _digest(folder) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.npz")):
        z = np.load(f)
        for k in sorted(z.files):
            h.update(k.encode())
            h.update(np.ascontiguousarray(z[k]).tobytes())
    h.update((folder / "synthetic.json").read_bytes())
    return h.hexdigest()


def test_default_regime_is_bit_for_bit_unchanged(tmp_path):
    generate(tmp_path, SyntheticSpec(n=30, size=32, depth=6, n_sites=3, seed=5))
    assert _digest(tmp_path) == DEFAULT_DIGEST


def test_conflict_regime_is_its_own_dataset(tmp_path):
    meta = generate(tmp_path / "c", SyntheticSpec(n=30, size=32, depth=6, regime="conflict"))
    assert meta["spec"]["regime"] == "conflict"
    assert json.loads((tmp_path / "c" / "synthetic.json").read_text())["spec"] == meta["spec"]
    assert synthetic_data(SyntheticSpec(n=8, size=16, depth=1)).name.endswith("seed0")
    assert synthetic_data(SyntheticSpec(n=8, size=16, depth=1, regime="conflict")).name.endswith(
        "-conflict"
    )
    assert tuple(REGIMES) == SYNTHETIC_REGIMES


def test_regime_with_a_data_folder_is_refused_in_one_line(tiny_data, capsys):
    from remdr.cli import train

    assert train.main(["--data", str(tiny_data), "--synthetic-regime", "conflict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--synthetic-regime conflict with --data" in err[0]


# -- the DIR regions in remdr-bench ----------------------------------------------------------------


def test_shot_regions_count_training_eyes_per_1db_bin():
    """30 training eyes at 0 dB (many-shot), 10 at -10 dB (medium), 1 at -25 dB (few); each test
    eye's error lands in its region's MAE."""
    from remdr.bench import shot_metrics

    train = np.array([0.2] * 30 + [-9.8] * 10 + [-24.5])
    md = np.array([0.5, 0.4, -9.5, -24.2, -24.9])
    pred = np.array([1.5, 0.4, -7.5, -20.2, np.nan])
    out = shot_metrics(train, md, pred)
    assert (out["n_many_shot"], out["n_medium_shot"], out["n_few_shot"]) == (2, 1, 1)
    assert out["mae_many_shot"] == pytest.approx(0.5)
    assert out["mae_medium_shot"] == pytest.approx(2.0)
    assert out["mae_few_shot"] == pytest.approx(4.0)
