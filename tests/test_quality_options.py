"""The training options of the quality work: LDS loss re-weighting, SAM every k-th step, early
stopping on validation, and the bench's ablation grid."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import TINY_CLI_FLAGS

from remdr.cli import bench
from remdr.config import MethodConfig, apply_overrides
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.errors import ConfigError
from remdr.federation.run_config import run_config_defaults, split_run_config
from remdr.losses import LabelDensity, lds_loss_weights, lds_norm
from remdr.method_config import LDS_AUTO, SITE_LDS_REWEIGHT
from remdr.methods import build_model, create_method
from remdr.model import full_precision
from remdr.runtime import seed_everything
from remdr.train import fit, make_loader


def _imbalanced(n: int = 4000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(0, 1, int(0.9 * n)), rng.normal(-20, 2, n - int(0.9 * n))])


def test_lds_weights_favour_rare_labels_keep_mean_one_and_clip():
    y = _imbalanced()
    density = LabelDensity.fit(y, sigma=2.0)
    norm = lds_norm(density, y, 0.5)
    w = lds_loss_weights(density, torch.tensor(y, dtype=torch.float32), 0.5, 100.0, norm)
    assert float(w.mean()) == pytest.approx(1.0, rel=0.05)  # the loss keeps its scale
    normal, severe = float(w[np.abs(y) < 1].mean()), float(w[y < -18].mean())
    assert severe > 2 * normal  # a rare label counts more
    clipped = lds_loss_weights(density, torch.tensor(y, dtype=torch.float32), power=1.0, clip=3.0)
    assert float(clipped.max()) == pytest.approx(3.0)
    flat = lds_loss_weights(density, torch.tensor(y, dtype=torch.float32), power=0.0, clip=3.0)
    assert torch.allclose(flat, torch.ones_like(flat))


def _batch(cfg, data_dir, n: int = 16):
    ds = EyeDataset(load_dataset(data_dir, cfg.data).records[:n], cfg.data)
    return next(iter(make_loader(ds, n, shuffle=False, seed=0, device=torch.device("cpu"))))


def test_reweighted_loss_is_the_weighted_mean_of_squared_errors(tiny_cfg, tiny_data):
    seed_everything(0, torch.device("cpu"))
    cfg = apply_overrides(tiny_cfg, {"lds-reweight": 0.5, "dropout": 0.0})
    method = create_method("concat", cfg.method)
    batch = _batch(cfg, tiny_data)
    method.setup(batch["md"].numpy())
    model = build_model(cfg, method).eval()
    loss, parts = method.loss(model, batch)
    out = model(batch["oct"], batch["fundus"], detach_heads=True)
    y = model.normalise(batch["md"])
    w = lds_loss_weights(
        method.density, batch["md"], 0.5, cfg.method.lds_weight_clip, method.lds_norm
    )
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-4)  # fitted on these labels
    expected = sum(
        ((full_precision(out[k]) - y) ** 2 * w).mean() for k in ("pred", "pred_oct", "pred_fundus")
    )
    torch.testing.assert_close(loss, expected)
    assert parts["mse"] == pytest.approx(float(((full_precision(out["pred"]) - y) ** 2 * w).mean()))


def test_private_methods_refuse_lds_reweighting():
    with pytest.raises(ConfigError, match="private labels"):
        create_method("concat_dp", MethodConfig(lds_reweight=0.5))


@pytest.mark.parametrize(
    "given, method, site_power",
    [
        ({}, "remdr", SITE_LDS_REWEIGHT),  # the federated default
        ({}, "concat", SITE_LDS_REWEIGHT),
        ({}, "remdr_dp", 0.0),  # a private method reads no statistic of its labels
        ({"lds-reweight": 0.0}, "remdr", 0.0),  # what a run config sets wins
        ({"lds-reweight": 0.5}, "remdr", 0.5),
    ],
)
def test_a_federations_sites_reweight_by_their_own_label_density_unless_told_not_to(
    given, method, site_power
):
    run_config = {**run_config_defaults(), "method": method, **given}
    assert run_config_defaults()["lds-reweight"] == LDS_AUTO
    cfg, _ = split_run_config(run_config)
    assert cfg.method.lds_reweight == site_power
    create_method(method, cfg.method)  # the resolved value is one the method takes


def test_pooled_training_left_at_auto_trains_plain_mse(tiny_cfg, tiny_data):
    """`auto` is a federation's: remdr-sim's centralized arm, which shares the run config's
    values, trains centralized Re-M3Dr's own default."""
    seed_everything(0, torch.device("cpu"))
    batch = _batch(tiny_cfg, tiny_data)
    losses = []
    for power in (LDS_AUTO, 0.0, 0.5):
        cfg = apply_overrides(tiny_cfg, {"lds-reweight": power, "dropout": 0.0})
        method = create_method("concat", cfg.method)
        method.setup(batch["md"].numpy())
        torch.manual_seed(0)
        losses.append(float(method.loss(build_model(cfg, method).eval(), batch)[0]))
    assert losses[0] == losses[1] != losses[2]


def test_a_negative_lds_power_other_than_auto_is_refused(tiny_cfg):
    with pytest.raises(ConfigError, match="lds-reweight=-0.5"):
        apply_overrides(tiny_cfg, {"lds-reweight": -0.5})


@pytest.mark.parametrize("every, passes", [(1, 12), (3, 8)])
def test_sam_every_k_steps_runs_the_second_pass_on_every_kth_step(
    every, passes, tiny_cfg, tiny_data
):
    seed_everything(0, torch.device("cpu"))
    cfg = apply_overrides(tiny_cfg, {"sam-every": every})
    method = create_method("remdr", cfg.method)
    batch = _batch(cfg, tiny_data, n=8)
    method.setup(batch["md"].numpy())
    model = build_model(cfg, method).train()
    forwards: list[int] = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(6):
        method.step(model, optimizer, batch, epoch=0)
    assert len(forwards) == passes  # every step's pass, plus an ascent pass on steps 1 and 4


def test_patience_stops_when_validation_stops_improving(tiny_cfg, tiny_data):
    # a learning rate below float32's resolution of the weights and no running statistics:
    # validation MSE is the same every epoch, so epoch 1 stays the best
    cfg = apply_overrides(
        tiny_cfg, {"lr": 1e-30, "weight-decay": 0.0, "group-norm": True, "patience": 2}
    )
    ds = load_dataset(tiny_data, cfg.data)
    train, val = EyeDataset(ds.records[:32], cfg.data), EyeDataset(ds.records[32:], cfg.data)
    method = create_method("concat", cfg.method)
    model = build_model(cfg, method)
    result = fit(model, method, train, cfg=cfg.train, device=torch.device("cpu"), val_ds=val,
                 epochs=10, progress=False)  # fmt: skip
    assert result.stopped_early and result.best_epoch == 1
    assert len(result.history) == 3  # epoch 1, then two without improvement
    whole = fit(model, method, train, cfg=cfg.train, device=torch.device("cpu"), val_ds=val,
                epochs=3, progress=False)  # fmt: skip
    assert not whole.stopped_early and len(whole.history) == 3  # the budget ended first


def test_bench_vary_runs_every_combination_on_the_same_seeds(tiny_data, tmp_path):
    out = tmp_path / "ablation"
    args = ["methods", "--data", str(tiny_data), "--methods", "concat", "--seeds", "2",
            "--vary", "lds-reweight=0,0.5", "--out", str(out), *TINY_CLI_FLAGS]  # fmt: skip
    assert bench.main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["method"], r["seed"]) for r in rows) == [
        ("concat [lds-reweight=0.5]", "0"),
        ("concat [lds-reweight=0.5]", "1"),
        ("concat [lds-reweight=0]", "0"),
        ("concat [lds-reweight=0]", "1"),
    ]
    assert all(float(r["val_mse"]) > 0 and int(r["best_epoch"]) >= 1 for r in rows)
    table = (out / "results.md").read_text()
    assert "| concat [lds-reweight=0.5] |" in table and "val MSE" in table


@pytest.mark.parametrize("vary", ["lds-reweight=-0.5", "no-such-key=1", "lds-reweight"])
def test_bench_vary_refuses_bad_values_before_training(vary, tiny_data, tmp_path, capsys):
    args = ["methods", "--data", str(tiny_data), "--vary", vary, "--out", str(tmp_path / "o")]
    assert bench.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_bench_vary_of_a_data_key_reads_the_data_again(tiny_data, tmp_path):
    out = tmp_path / "views"
    args = ["methods", "--data", str(tiny_data), "--methods", "oct", "--seeds", "1",
            "--vary", "oct-view=rnflt,bscans", "--out", str(out), *TINY_CLI_FLAGS]  # fmt: skip
    assert bench.main(args) == 0  # the thickness-map model gets maps, the B-scan model volumes
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {r["method"] for r in rows} == {"oct [oct-view=rnflt]", "oct [oct-view=bscans]"}
    assert len({r["mse"] for r in rows}) == 2


def test_augment_strength_scales_the_same_draws():
    from remdr.data.transforms import augment_image

    x = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))

    def at(strength: float) -> torch.Tensor:
        return augment_image(x, torch.Generator().manual_seed(1), strength)

    torch.testing.assert_close(at(0.0), x, atol=1e-5, rtol=0)  # nothing moves
    change = [float((at(s) - x).abs().mean()) for s in (0.5, 1.0, 2.0)]
    assert change[0] < change[1] < change[2]


def test_a_modality_scale_changes_only_that_branchs_learning_rate(tiny_cfg, tiny_data):
    """lr-fundus-scale: the fundus branch and head move at that fraction of the rate, the OCT
    branch and the fusion head at the full rate (plain SGD, so a step is lr x gradient)."""
    base = {"optimizer": "sgd", "momentum": 0.0, "weight-decay": 0.0, "schedule": "constant"}
    ds = load_dataset(tiny_data, tiny_cfg.data)
    train = EyeDataset(ds.records[:8], tiny_cfg.data)
    moved = {}
    for scale in (1.0, 0.25):
        cfg = apply_overrides(tiny_cfg, {**base, "lr-fundus-scale": scale, "batch-size": 8})
        method = create_method("multitask", cfg.method)
        torch.manual_seed(0)
        model = build_model(cfg, method)
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        fit(model, method, train, cfg=cfg.train, device=torch.device("cpu"), epochs=1,
            steps=1, progress=False)  # fmt: skip
        moved[scale] = {k: (v.detach() - before[k]) for k, v in model.named_parameters()}
    for key, full in moved[1.0].items():
        if not full.abs().sum():
            continue
        ratio = 0.25 if key.startswith(("branches.fundus", "heads.fundus")) else 1.0
        tol = 1e-3 * float(full.abs().max())  # float32 rounding of the smallest updates
        assert torch.allclose(moved[0.25][key], ratio * full, rtol=1e-3, atol=tol), key
