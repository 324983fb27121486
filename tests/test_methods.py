"""Generated from the registry: every method steps, reaches every parameter, saves its state."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from remdr.config import ExperimentConfig, MethodConfig, apply_overrides
from remdr.data import load_dataset
from remdr.data.dataset import EyeDataset
from remdr.errors import ConfigError
from remdr.methods import build_model, create_method
from remdr.registry import get_spec, list_methods
from remdr.runtime import seed_everything
from remdr.train import fit, make_loader

ALL = list_methods()


def _batch(cfg: ExperimentConfig, data_dir, n: int = 12) -> dict[str, torch.Tensor]:
    ds = EyeDataset(load_dataset(data_dir, cfg.data).records[:n], cfg.data)
    return next(iter(make_loader(ds, n, shuffle=False, seed=0, device=torch.device("cpu"))))


def test_registry_lists_design_methods():
    assert set(ALL) >= {
        "oct",
        "fundus",
        "concat",
        "ogm_ge",
        "sam",
        "remdr",
        "remdr_no_con",
        "remdr_no_sagm",
        "multitask",
        "ume",
        "mmpareto",
        "masam",
        "mla",
        "agm",
    }
    with pytest.raises(ConfigError, match="did you mean remdr"):
        get_spec("remdrr")


@pytest.mark.parametrize("name", ALL)
def test_step_is_finite_and_every_parameter_gets_a_gradient(name, tiny_cfg, tiny_data):
    seed_everything(0, torch.device("cpu"))
    method = create_method(name, tiny_cfg.method)
    batch = _batch(tiny_cfg, tiny_data)
    method.setup(batch["md"].numpy())
    model = build_model(tiny_cfg, method).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    step_model = model
    if method.spec.private:  # DP methods step only as Opacus' clipped, noised step
        from opacus.optimizers import DPOptimizer

        from remdr.privacy.gradcheck import choose_grad_sample_mode, wrap_model

        mode = choose_grad_sample_mode(model, lambda m, b: method.loss(m, b)[0], batch)
        step_model = wrap_model(model, mode)
        opt = DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=8)
    parts = method.step(step_model, opt, batch, epoch=0)
    assert np.isfinite(parts["loss"])
    missing = [
        n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
    ]
    assert not missing, f"{name}: no/invalid gradient for {missing[:5]}"
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ALL)
def test_method_state_round_trips(name, tiny_data, tiny_cfg):
    method = create_method(name, tiny_cfg.method)
    method.setup(np.array([-1.0, -5.0, -20.0, 0.5]))
    method.scores.update({m: 0.3 + i for i, m in enumerate(method.spec.modalities)})
    other = create_method(name, tiny_cfg.method)
    other.load_state_dict(method.state_dict())
    assert other.state_dict() == method.state_dict()
    with pytest.raises(ValueError):
        other.load_state_dict({**method.state_dict(), "name": "something-else"})


@pytest.mark.parametrize("name", ALL)
def test_each_method_trains_one_epoch(name, tiny_cfg, tiny_data):
    cfg = apply_overrides(tiny_cfg, {"method": name})
    ds = EyeDataset(load_dataset(tiny_data, cfg.data).records, cfg.data)
    method = create_method(name, cfg.method)
    method.setup(ds.targets())
    model = build_model(cfg, method)
    result = fit(
        model,
        method,
        ds,
        cfg=cfg.train,
        device=torch.device("cpu"),
        val_ds=ds,
        epochs=1,
        progress=False,
    )
    if method.spec.private:  # Poisson batches over patients: ceil(patients / batch) steps
        patients = len({r.patient_id for r in ds.records})
        assert result.n_steps == -(-patients // cfg.train.batch_size)
        assert (
            result.privacy["steps"] == result.n_steps and result.privacy["epsilon_cumulative"] > 0
        )
    else:
        assert result.n_steps == len(ds) // cfg.train.batch_size
    assert np.isfinite(result.history[0]["train_loss"]) and np.isfinite(result.best_val_mse)


@pytest.mark.parametrize(
    "name, contrastive, passes, modulated",
    [
        ("remdr", True, 2, True),
        ("remdr_no_con", False, 2, True),
        ("remdr_no_sagm", True, 1, False),
        ("sam", False, 2, False),
        ("concat", False, 1, False),
        ("multitask", False, 1, False),
        ("ume", False, 1, False),
        ("mmpareto", False, 1, False),  # one forward, two backwards
        ("masam", False, 2, False),  # the first step takes the ascent
        ("mla", False, 2, False),  # one forward per modality
        ("agm", False, 1, False),  # the Shapley responses re-run only the fusion head
    ],
)
def test_default_config_runs_the_parts_each_method_names(
    name, contrastive, passes, modulated, tiny_cfg, tiny_data
):
    """At the default settings Re-M3Dr runs every part of the design (contrastive terms, a SAM
    second pass, modulation from epoch 0) and each ablation drops exactly its own part."""
    seed_everything(0, torch.device("cpu"))
    method = create_method(name, MethodConfig())
    batch = _batch(tiny_cfg, tiny_data)
    method.setup(batch["md"].numpy())
    model = build_model(tiny_cfg, method).train()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    parts = method.step(model, torch.optim.SGD(model.parameters(), lr=1e-3), batch, epoch=0)
    assert len(forwards) == passes
    assert {"con_oct", "con_fundus"} <= parts.keys() if contrastive else "con_oct" not in parts
    modulates = method.spec.update in ("modulate", "sagm") and method.modulation_active(0)
    assert modulates is modulated
