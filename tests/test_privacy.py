"""Sample-level DP: checked per-sample gradients, per-example losses, accounting and the ledger."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY
from opacus.accountants import RDPAccountant
from torch import nn

from remdr.config import ExperimentConfig, PrivacyConfig, apply_overrides
from remdr.errors import PrivacyError
from remdr.experiment import load_splits
from remdr.methods import build_model, create_method
from remdr.privacy import (
    PrivacyLedger,
    choose_grad_sample_mode,
    epsilon_of,
    make_dp_ready,
    open_private,
    per_sample_gradient_error,
    plan,
    privacy_report,
    probe_batch,
)
from remdr.privacy.gradcheck import CHECK_TOLERANCE, unwrap_model, wrap_model
from remdr.train import fit

DP = {**TINY, "method": "remdr_dp", "oct-view": "rnflt", "dropout": 0.0}


def _cfg(**extra) -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), {**DP, **extra})


def _model_and_loss(cfg: ExperimentConfig, method: str = "remdr_dp"):
    torch.manual_seed(0)
    m = create_method(method, cfg.method)
    return m, build_model(cfg, m), (lambda model, b: m.loss(model, b)[0])


def _probe(cfg: ExperimentConfig, n: int = 4) -> dict[str, torch.Tensor]:
    s = cfg.data.image_size
    oct_shape = (cfg.data.n_bscans, 1, s, s) if cfg.data.oct_view == "bscans" else (1, s, s)
    return probe_batch({"oct": torch.zeros(oct_shape), "fundus": torch.zeros(1, s, s)}, n=n)


@pytest.mark.parametrize(
    "encoder, view",
    [
        ("test_resnet", "rnflt"),
        ("test_resnet", "bscans"),  # the shared encoder is called once per B-scan
        # timm's fused BatchNormAct2d; its real-size check takes ~16 s, so the slow tier runs it
        pytest.param("efficientnet_b0", "rnflt", marks=pytest.mark.slow),
        ("convnext_atto", "rnflt"),  # downsample convs need contiguous inputs
    ],
)
def test_per_sample_gradients_of_the_dp_model_pass_the_check(encoder, view):
    cfg = _cfg(**{"oct-encoder": encoder, "fundus-encoder": encoder, "oct-view": view})
    _, model, loss = _model_and_loss(cfg)
    mode = choose_grad_sample_mode(model, loss, _probe(cfg))
    assert per_sample_gradient_error(model, loss, _probe(cfg), mode=mode) <= CHECK_TOLERANCE
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) is True for m in model.modules())


def test_the_check_catches_wrong_per_sample_gradients():
    """ConvNeXt without the contiguous-input fix: Opacus runs but its gradients are wrong."""
    cfg = _cfg(**{"oct-encoder": "convnext_atto", "fundus-encoder": "convnext_atto"})
    _, model, loss = _model_and_loss(cfg)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m._forward_pre_hooks.clear()
    assert per_sample_gradient_error(model, loss, _probe(cfg), mode="hooks") > 10 * CHECK_TOLERANCE
    with pytest.raises(PrivacyError, match="per-sample gradients"):
        choose_grad_sample_mode(model, loss, _probe(cfg), requested="hooks")


def test_fused_batchnorm_act_becomes_groupnorm():
    import timm

    net = timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)
    assert any(type(m).__name__ == "BatchNormAct2d" for m in net.modules())
    fixed = make_dp_ready(net)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fixed.modules())
    assert fixed(torch.randn(2, 3, 32, 32)).shape == (2, net.num_features)


def _per_row_grads(model, loss, batch) -> torch.Tensor:
    """Opacus' per-row gradients (what DP-SGD clips), flattened: (B, n_params)."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    wrapped = wrap_model(model, "ew")
    loss(wrapped, batch).backward()
    rows = torch.cat(
        [p.grad_sample.flatten(1) for p in model.parameters() if p.grad_sample is not None], 1
    )
    unwrap_model(wrapped, model)
    return rows.detach().clone()


@pytest.mark.parametrize("objective, coupled", [("remdr_dp", False), ("remdr", True)])
def test_replacing_one_patient_changes_no_other_rows_gradient(objective, coupled):
    """The DP objective is per-example; Re-M3Dr's in-batch SupCon is not (and so is not DP)."""
    cfg = _cfg()
    _, model, _ = _model_and_loss(cfg)  # one DP-ready model, two objectives
    loss_method = create_method(objective, cfg.method)
    loss = lambda m, b: loss_method.loss(m, b)[0]  # noqa: E731
    batch = _probe(cfg, n=8)
    batch["md"] = torch.tensor([-2.0, -2.4, -10.0, -10.5, -20.0, -20.3, -5.0, -5.6])
    replaced = {k: v.clone() for k, v in batch.items()}
    gen = torch.Generator().manual_seed(9)
    for k in ("oct", "fundus"):
        replaced[k][0] = torch.randn(replaced[k][0].shape, generator=gen)
    replaced["md"][0] = -2.2
    before, after = _per_row_grads(model, loss, batch), _per_row_grads(model, loss, replaced)
    assert not torch.allclose(before[0], after[0])  # the replaced row itself changes
    others = (before[1:] - after[1:]).norm(dim=1) / before[1:].norm(dim=1)
    if coupled:
        assert (others > 1e-3).all()
    else:
        assert float(others.max()) < 1e-5


def _train(data, cfg: ExperimentConfig):
    m = create_method(cfg.train.method, cfg.method)
    m.setup(data.train.targets())
    torch.manual_seed(0)
    model = build_model(cfg, m)
    result = fit(
        model, m, data.train, cfg=cfg.train, device=torch.device("cpu"), privacy=cfg.privacy
    )
    return model, result


def _independent_epsilon(entries: list[dict], delta: float) -> float:
    acc = RDPAccountant()
    for e in entries:
        for _ in range(e["steps"]):
            acc.step(noise_multiplier=e["noise_multiplier"], sample_rate=e["sample_rate"])
    return acc.get_epsilon(delta)


def test_epsilon_matches_an_independent_accountant_and_survives_a_restart(tiny_data, tmp_path):
    ledger = tmp_path / "site" / "privacy-ledger.jsonl"
    cfg = _cfg(**{"dp-ledger": str(ledger), "dp-noise": 1.3, "epochs": 2})
    data = load_splits(tiny_data, cfg)
    _, first = _train(data, cfg)
    entries = [json.loads(line) for line in ledger.read_text().splitlines()]
    assert len(entries) == 1 and entries[0]["unit"] == "patient"
    assert entries[0]["steps"] == 2 * int(round(1 / entries[0]["sample_rate"]))
    assert first.privacy["epsilon_cumulative"] == pytest.approx(
        _independent_epsilon(entries, cfg.privacy.dp_delta), rel=1e-9
    )
    # a new process: nothing in memory, only the file; the budget keeps accumulating
    _, second = _train(data, cfg)
    entries = PrivacyLedger(ledger).entries()
    assert len(entries) == 2
    total = _independent_epsilon(entries, cfg.privacy.dp_delta)
    assert second.privacy["epsilon_cumulative"] == pytest.approx(total, rel=1e-9)
    assert total > first.privacy["epsilon_cumulative"]
    report = privacy_report(ledger)
    assert f"epsilon = {total:.3f}" in report and "not covered" in report


def test_ceiling_declines_training_before_it_is_exceeded(tiny_data, tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    cfg = _cfg(**{"dp-ledger": str(ledger)})
    data = load_splits(tiny_data, cfg)
    _, first = _train(data, cfg)
    spent = first.privacy["epsilon_cumulative"]
    capped = apply_overrides(cfg, {"dp-epsilon-max": spent * 1.2})  # one more would exceed it
    m = create_method("remdr_dp", capped.method)
    model = build_model(capped, m)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PrivacyError, match="declined") as err:
        fit(
            model,
            m,
            data.train,
            cfg=capped.train,
            device=torch.device("cpu"),
            privacy=capped.privacy,
        )
    assert f"{spent:.2f}" in str(err.value)
    assert len(PrivacyLedger(ledger).entries()) == 1  # nothing was spent
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_target_epsilon_solves_sigma(tiny_data):
    cfg = _cfg(**{"dp-target-epsilon": 4.0, "epochs": 2})
    _, result = _train(load_splits(tiny_data, cfg), cfg)
    assert result.privacy["epsilon_cumulative"] == pytest.approx(4.0, abs=0.05)


def test_bad_privacy_settings_are_clear_errors(tiny_data, tmp_path):
    data = load_splits(tiny_data, _cfg())
    for extra, match in [({"dp-delta": 0.5}, "dp-delta"), ({"dp-noise": 0.0}, "no privacy")]:
        cfg = _cfg(**extra)
        m = create_method("remdr_dp", cfg.method)
        with pytest.raises(PrivacyError, match=match):
            fit(build_model(cfg, m), m, data.train, cfg=cfg.train,
                device=torch.device("cpu"), privacy=cfg.privacy)  # fmt: skip
    corrupt = tmp_path / "ledger.jsonl"
    corrupt.write_text('{"noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3}\nnot json\n')
    with pytest.raises(PrivacyError, match="line 2 is corrupt"):
        PrivacyLedger(corrupt).epsilon(1e-5)


def test_a_private_method_never_steps_without_dp():
    cfg = _cfg()
    m, model, _ = _model_and_loss(cfg)
    batch = _probe(cfg)
    with pytest.raises(PrivacyError, match="only under DP-SGD"):
        m.step(model, torch.optim.SGD(model.parameters(), lr=0.1), batch, 0)


def test_the_budget_composes_every_release_in_the_ledger_and_plan_stops_at_the_ceiling(tmp_path):
    """Releases of different (sigma, q, steps), aborted ones included, compose into the ledger's
    epsilon exactly as an independent replay of those steps; `plan` adds its planned steps to
    that history and declines just above the ceiling, accepting just below it."""
    delta, ledger = 1e-5, PrivacyLedger(tmp_path / "ledger.jsonl")
    assert ledger.epsilon(delta) == 0.0  # no file yet: nothing spent
    releases = [
        ("completed", 1.1, 0.05, 40),
        ("aborted", 0.8, 0.1, 7),  # failed part-way: its steps were still released
        ("aborted", 0.9, 0.2, 0),  # failed before its first step: nothing released
        ("completed", 1.3, 0.1, 60),
    ]
    for status, sigma, q, steps in releases:
        ledger.append(
            {"status": status, "noise_multiplier": sigma, "sample_rate": q, "steps": steps}
        )
    entries = ledger.entries()
    spent = _independent_epsilon(entries, delta)
    assert ledger.epsilon(delta) == pytest.approx(spent, rel=1e-9)
    for i, e in enumerate(entries):  # the check can fail: every release with steps counts
        if e["steps"]:
            assert _independent_epsilon(entries[:i] + entries[i + 1 :], delta) < 0.99 * spent

    # 40 patients in batches of 8: 5 steps per epoch at q = 1/5, for 2 epochs
    shape = dict(patients=40, batch_size=8, epochs=2)
    planned = {"noise_multiplier": 1.5, "sample_rate": 0.2, "steps": 10}
    after = _independent_epsilon([*entries, planned], delta)
    assert _independent_epsilon([planned], delta) < 0.99 * spent  # alone it would pass: history
    fits = PrivacyConfig(dp_noise=1.5, dp_delta=delta, dp_epsilon_max=after * 1.001)
    p = plan(fits, ledger.history(), **shape)
    assert (p.noise_multiplier, p.sample_rate, p.steps) == (1.5, 0.2, 10)
    assert p.epsilon_before == pytest.approx(spent, rel=1e-9)
    assert p.epsilon_after == pytest.approx(after, rel=1e-9)
    too_tight = PrivacyConfig(dp_noise=1.5, dp_delta=delta, dp_epsilon_max=after * 0.999)
    with pytest.raises(PrivacyError, match="declined"):
        plan(too_tight, ledger.history(), **shape)
    assert epsilon_of([(0.0, 0.1, 1)], delta) == float("inf")  # no noise: no guarantee


def test_remdr_dp_without_the_contrastive_term_has_no_unused_layers(tiny_data):
    cfg = _cfg(**{"lambda-con": 0.0})
    _, result = _train(load_splits(tiny_data, cfg), cfg)
    assert result.privacy["steps"] > 0 and np.isfinite(result.history[-1]["train_loss"])


# -- issue 13: guarantees that hold against the coordinator ---------------------------------


def _site_round(tiny_data, cfg: ExperimentConfig, *, rounds: int = 1, **fed_settings):
    """`rounds` rounds of `train_round` at one site from the same global model; their results."""
    from remdr.federation.run_config import FedConfig
    from remdr.federation.site_round import load_site, train_round

    fed = FedConfig(num_server_rounds=rounds, **fed_settings)
    site = load_site(tiny_data, cfg, seed=cfg.train.seed)
    torch.manual_seed(0)
    state = build_model(cfg).state_dict()
    results = []
    for r in range(1, rounds + 1):
        results.append(train_round(cfg, fed, state, site, server_round=r))
        state = results[-1].state
    return results


def _same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_private_randomness_is_not_the_run_seed(tiny_data, tmp_path):
    """Two private trainings with the same seed and config end with different weights (the
    coordinator's seed fixes neither the sampling nor the noise); the ledger says so."""
    from remdr.experiment import train_and_test

    ledger = tmp_path / "ledger.jsonl"
    cfg = _cfg(**{"method": "concat_dp", "dp-ledger": str(ledger), "seed": 7})
    runs = [train_and_test(cfg, load_splits(tiny_data, cfg), progress=False) for _ in range(2)]
    assert not _same_weights(runs[0].model.state_dict(), runs[1].model.state_dict())
    for entry in PrivacyLedger(ledger).entries():
        assert entry["randomness"] == "os-entropy"
        assert {"poisson-sampling", "gaussian-noise"} <= set(entry["randomness_covers"])
    assert "os-entropy" in privacy_report(ledger)


@pytest.mark.parametrize("name", ["concat_dp", "remdr_dp"])
def test_empty_poisson_batches_still_release_noise_and_training_completes(tiny_data, name):
    """18 patients at batch 2: q = 1/9, so a Poisson batch is empty with P = 0.12 and 72 steps
    meet one with P > 0.9999. Each must still take its noised step, and the loss is averaged
    over the non-empty batches only."""
    cfg = _cfg(**{"method": name, "batch-size": 2, "epochs": 8, "dp-epsilon-max": 1e6})
    data = load_splits(tiny_data, cfg)
    m = create_method(name, cfg.method)
    model = build_model(cfg, m)
    empty_steps = 0
    real_step = m.step

    def counting_step(train_model, optimizer, batch, *args, **kwargs):
        nonlocal empty_steps
        before = [p.detach().clone() for p in train_model.parameters()]
        parts = real_step(train_model, optimizer, batch, *args, **kwargs)
        if len(batch["md"]) == 0:
            empty_steps += 1
            assert "loss" not in parts
            after = list(train_model.parameters())
            assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
        return parts

    m.step = counting_step
    result = fit(model, m, data.train, cfg=cfg.train, device=torch.device("cpu"),
                 privacy=cfg.privacy)  # fmt: skip
    assert empty_steps > 0
    assert np.isfinite(result.history[-1]["train_loss"])


def test_an_empty_first_poisson_batch_is_an_empty_dict_batch(tiny_data):
    """Opacus' own empty first batch assumes tuple samples; ours are dicts. The private loader
    answers an empty draw with zero-row tensors of each item's shape instead."""
    cfg = _cfg(**{"method": "concat_dp", "dp-epsilon-max": 1e6})
    data = load_splits(tiny_data, cfg)
    m = create_method("concat_dp", cfg.method)
    model = build_model(cfg, m)
    session = open_private(
        model, torch.optim.SGD(model.parameters(), lr=0.1), data.train,
        loss_fn=lambda mod, b: m.loss(mod, b)[0], method_name="concat_dp", train_cfg=cfg.train,
        privacy=cfg.privacy, epochs=1,
    )  # fmt: skip
    try:
        empty = session.loader.collate_fn([])
        item = data.train[0]
        assert set(empty) == set(item)
        for k, v in item.items():
            assert empty[k].shape == (0, *v.shape) and empty[k].dtype == v.dtype
        full = session.loader.collate_fn([data.train[0], data.train[1]])
        assert full["md"].shape == (2,)
    finally:
        session.close("aborted", model)


def test_two_sites_in_one_round_draw_different_noise(tiny_data):
    """Same round, same run seed, same data and global model: two sites still differ."""
    cfg = _cfg(**{"method": "concat_dp", "dp-epsilon-max": 1e6})
    first, second = (_site_round(tiny_data, cfg)[0] for _ in range(2))
    assert not _same_weights(first.state, second.state)


@pytest.mark.parametrize("name", ["concat_dp", "remdr_dp"])
def test_fedprox_with_a_private_method_completes_every_round(tiny_data, tmp_path, name):
    """The proximal anchor matches the Opacus-wrapped parameters: two rounds, two completed
    releases in the ledger, the site's epsilon equal to an independent replay."""
    ledger = tmp_path / "ledger.jsonl"
    cfg = _cfg(**{"method": name, "dp-ledger": str(ledger)})
    results = _site_round(tiny_data, cfg, rounds=2, strategy="fedprox", proximal_mu=0.1)
    entries = PrivacyLedger(ledger).entries()
    assert [e["status"] for e in entries] == ["completed", "completed"]
    assert [e["round"] for e in entries] == [1, 2]
    assert all(np.isfinite(r.metrics["train-loss"]) for r in results)
    assert results[-1].metrics["dp-epsilon"] == pytest.approx(
        _independent_epsilon(entries, cfg.privacy.dp_delta), rel=1e-9
    )


def test_proximal_term_matches_parameters_of_a_wrapped_model():
    from remdr.optim import proximal_term

    cfg = _cfg(**{"method": "concat_dp"})
    _, model, _ = _model_and_loss(cfg, "concat_dp")
    anchor = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    term = proximal_term(model, anchor, 1.0)
    plain = float(term(model).detach())
    wrapped = wrap_model(model, "hooks")
    assert plain > 0 and float(term(wrapped).detach()) == pytest.approx(plain)
    unwrap_model(wrapped, model)


def test_a_failure_inside_a_site_round_is_one_line(tiny_data, monkeypatch):
    from remdr.errors import RemdrError
    from remdr.federation import site_round

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(site_round, "fit", broken)
    with pytest.raises(RemdrError, match="round 1") as err:
        _site_round(tiny_data, _cfg(**{"method": "concat"}))
    assert "\n" not in str(err.value) and "boom" in str(err.value)


@pytest.mark.parametrize("name", ["concat_dp", "remdr_dp"])
def test_no_statistic_of_private_labels_leaves_a_private_method(tiny_data, name):
    """Nothing a private method keeps, saves or sends depends on the labels: its state after
    setup on two different label sets equals a fresh one, and a site's round sends no density."""
    cfg = _cfg(**{"method": name, "dp-epsilon-max": 1e6})
    fresh = create_method(name, cfg.method).state_dict()
    for targets in (np.full(40, -2.0), np.linspace(-30.0, 0.0, 57)):
        m = create_method(name, cfg.method)
        m.setup(targets, seed=0)
        assert json.dumps(m.state_dict(), sort_keys=True) == json.dumps(fresh, sort_keys=True)
        assert "density" not in m.state_dict()
    sent = _site_round(tiny_data, cfg)[0].method_state
    assert "density" not in sent and set(sent) == {"name", "scores"}
    assert not create_method("concat", cfg.method).spec.private  # non-private keeps its LDS
    lds = create_method("remdr", cfg.method)
    lds.setup(np.full(40, -2.0))
    assert "density" in lds.state_dict()


def _race_for_the_last_budget(tiny_data, ledger, ceiling, start, out) -> None:
    import warnings

    warnings.simplefilter("ignore")
    cfg = _cfg(**{"method": "concat_dp", "dp-ledger": str(ledger), "dp-epsilon-max": ceiling})
    data = load_splits(tiny_data, cfg)
    m = create_method("concat_dp", cfg.method)
    torch.manual_seed(0)
    model = build_model(cfg, m)
    start.wait()
    try:
        fit(model, m, data.train, cfg=cfg.train, device=torch.device("cpu"), privacy=cfg.privacy,
            progress=False)  # fmt: skip
        out.put("trained")
    except PrivacyError as err:
        out.put(f"declined: {err}")


@pytest.mark.slow  # two spawned interpreters that each import torch and train: ~13 s
def test_two_processes_cannot_both_spend_the_last_of_the_budget(tiny_data, tmp_path):
    """Two sessions at one site start at once with room for one training under the ceiling:
    one trains, the other declines with a one-line PrivacyError, the ledger stays under it."""
    import multiprocessing as mp

    probe_ledger = tmp_path / "probe.jsonl"
    cfg = _cfg(**{"method": "concat_dp", "dp-ledger": str(probe_ledger)})
    _, probe = _train(load_splits(tiny_data, cfg), cfg)
    ceiling = probe.privacy["epsilon_session"] * 1.3  # one training fits, two do not
    assert _independent_epsilon([probe.privacy] * 2, cfg.privacy.dp_delta) > ceiling
    ledger = tmp_path / "site" / "ledger.jsonl"
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_race_for_the_last_budget, args=(tiny_data, ledger, ceiling, start, out))
        for _ in range(2)
    ]
    for p in procs:
        p.start()
    outcomes = sorted(out.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcomes[1] == "trained", outcomes
    assert outcomes[0].startswith("declined: ") and "\n" not in outcomes[0], outcomes
    entries = PrivacyLedger(ledger).entries()
    assert len(entries) == 1
    assert _independent_epsilon(entries, cfg.privacy.dp_delta) <= ceiling


def test_accounting_leaves_the_programs_logging_alone():
    """Opacus calls logging.basicConfig on import; in Flower's ServerApp that root handler
    printed every log line twice (the resume test counts rounds in that log)."""
    code = (
        "import logging; from remdr.privacy.accounting import epsilon_of; "
        "epsilon_of([(1.0, 1.0, 1)], 1e-5); print(len(logging.getLogger().handlers))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
