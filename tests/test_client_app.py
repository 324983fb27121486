"""The ClientApp's handlers called directly with constructed Messages, and the strategy wiring."""

from __future__ import annotations

import time
import tomllib
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from remdr.client.app import PRIVACY_DECLINED, VERSION_MISMATCH
from remdr.server.reply_metrics import aggregate_metrics
from remdr.server.strategy import build_strategy
from site_app import app

from remdr.errors import ConfigError
from remdr.federation.app_bundle import bundle_pyproject
from remdr.federation.run_config import run_config_defaults, split_run_config
from remdr.federation.site_round import norm_state_keys
from remdr.methods import build_model, create_method
from remdr.privacy import PrivacyLedger

RUN_CONFIG = {**run_config_defaults(), **TINY, "local-epochs": 1}


def _message(kind: str, arrays: dict, config: dict) -> Message:
    """A message as Flower delivers it: its id is unique (a site trains each message once)."""
    content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)})
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    return Message(content=content, metadata=meta)


def _initial(run_config: dict) -> dict[str, torch.Tensor]:
    cfg, _ = split_run_config(run_config)
    torch.manual_seed(0)
    return build_model(cfg).state_dict()


def _context(tiny_data: Path, run_config: dict, state: RecordDict | None = None, **node) -> Context:
    node_config = {"data-path": str(tiny_data), "site-id": "hospA", **node}
    return Context(
        run_id=1,
        node_id=7,
        node_config=node_config,
        state=state or RecordDict(),
        run_config=run_config,
    )


def test_train_reply_has_weights_metrics_and_keeps_state(tiny_data):
    run_config = {**RUN_CONFIG, "method": "remdr", "fedbn": True}
    initial = _initial(run_config)
    ctx = _context(tiny_data, run_config)
    reply = app(
        _message(MessageType.TRAIN, initial, {"server-round": 1, "remdr-version": "0.1.0"}), ctx
    )
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] > 0 and metrics["train-seconds"] > 0
    received = ("val-mse", "val-mae", "val-mae-severe", "val-mae-bin-avg")
    for key in ("train-loss", *(f"received-{k}" for k in received)):
        assert key in metrics
    # every tiny eye has both images: each part of the model trained on all of them
    n = metrics["num-examples"]
    assert metrics["eyes-oct"] == metrics["eyes-fundus"] == metrics["eyes-complete"] == n
    new = reply.content["arrays"].to_torch_state_dict()
    assert new.keys() == initial.keys()
    assert any(not torch.equal(new[k], initial[k]) for k in initial)
    assert reply.content["site"]["site-id"] == "hospA"
    assert "method" in ctx.state and "fedbn" in ctx.state  # EMA scores and local norm layers
    # only weights and aggregate metrics leave the site: no arrays other than the model
    assert list(reply.content.array_records) == ["arrays"]


def test_a_site_rescans_its_data_folder_only_after_a_file_changed(tiny_data, tmp_path, monkeypatch):
    """The site worker runs every round in one process: it reads the folder again only when
    its files changed (a new eye counts from the next round on)."""
    import shutil

    from remdr.federation import site_round

    data = tmp_path / "site"
    shutil.copytree(tiny_data, data)
    scans, scan = [], site_round.load_dataset
    monkeypatch.setattr(
        site_round, "load_dataset", lambda *a, **k: scans.append(1) or scan(*a, **k)
    )
    ctx, initial = _context(data, RUN_CONFIG), _initial(RUN_CONFIG)

    def eyes(server_round: int) -> float:
        reply = app(_message(MessageType.TRAIN, initial, {"server-round": server_round}), ctx)
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        m = reply.content["metrics"]
        return m["num-examples"] + m["received-num-val"]

    before = eyes(1)
    assert eyes(2) == before and len(scans) == 1
    first = sorted(data.rglob("*.npz"))[0]
    with np.load(first) as z:  # one more eye of a new patient
        arrays = {k: z[k] for k in z.files}
    arrays["patient_id"] = np.array("new-patient")
    np.savez(first.with_name("new-eye.npz"), **arrays)
    assert eyes(3) == before + 1 and len(scans) == 2


def test_fedbn_keeps_local_norm_layers(tiny_data):
    run_config = {**RUN_CONFIG, "method": "concat", "fedbn": True}
    initial = _initial(run_config)
    ctx = _context(tiny_data, run_config)
    app(_message(MessageType.TRAIN, initial, {"server-round": 1}), ctx)
    local = ctx.state["fedbn"].to_torch_state_dict()
    assert set(local) == set(norm_state_keys(build_model(split_run_config(run_config)[0])))
    # the next round starts from the global weights but with this site's own norm layers
    reply = app(_message(MessageType.EVALUATE, initial, {"server-round": 1}), ctx)
    plain = app(
        _message(MessageType.EVALUATE, initial, {"server-round": 1}),
        _context(tiny_data, run_config),
    )
    assert reply.content["metrics"]["val-mse"] != plain.content["metrics"]["val-mse"]


def test_evaluate_reply(tiny_data):
    initial = _initial(RUN_CONFIG)
    reply = app(
        _message(MessageType.EVALUATE, initial, {"server-round": 1}),
        _context(tiny_data, RUN_CONFIG),
    )
    m = reply.content["metrics"]
    assert m["num-examples"] == m["num-val"] > 0 and m["val-mse"] > 0


def test_incompatible_version_is_a_clear_error_reply(tiny_data):
    reply = app(
        _message(MessageType.TRAIN, _initial(RUN_CONFIG), {"remdr-version": "9.0.0"}),
        _context(tiny_data, RUN_CONFIG),
    )
    assert reply.has_error() and reply.error.code == VERSION_MISMATCH
    assert "hospA" in reply.error.reason and "9.0.0" in reply.error.reason


def test_missing_data_is_an_error_reply_not_a_crash(tmp_path):
    reply = app(
        _message(MessageType.TRAIN, _initial(RUN_CONFIG), {}),
        _context(tmp_path / "nope", RUN_CONFIG),
    )
    assert reply.has_error() and "does not exist" in reply.error.reason


def test_run_config_split_and_unknown_keys():
    cfg, fed = split_run_config(
        {"strategy": "fedprox", "proximal-mu": "0.1", "lr": 0.01, "fedbn": "true"}
    )
    assert (
        fed.strategy == "fedprox"
        and fed.proximal_mu == 0.1
        and fed.fedbn is True
        and cfg.train.lr == 0.01
    )
    with pytest.raises(ConfigError, match="unknown config key"):
        split_run_config({"learning-rate": 0.1})
    with pytest.raises(ConfigError, match="strategy"):
        split_run_config({"strategy": "fedsgd"})


@pytest.mark.parametrize(
    "name", ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"]
)
def test_strategy_wiring_is_a_fixed_cohort(name):
    _, fed = split_run_config({"strategy": name, "min-nodes": 3})
    s = build_strategy(fed).inner
    assert type(s).__name__.lower() == name
    assert s.min_train_nodes == s.min_available_nodes == 3
    assert s.fraction_evaluate == 0.0  # one message per round: the train reply scores the model
    _, fed = split_run_config({"strategy": name, "min-nodes": 3, "separate-evaluate": "true"})
    s = build_strategy(fed).inner
    assert s.min_train_nodes == s.min_evaluate_nodes == s.min_available_nodes == 3
    if name == "fedprox":
        assert s.proximal_mu == fed.proximal_mu


def test_metric_aggregation_is_weighted_and_ignores_nan():
    from flwr.app import MetricRecord

    recs = [
        RecordDict(
            {
                "m": MetricRecord(
                    {"num-examples": 30, "val-mse": 2.0, "val-mae-severe": float("nan")}
                )
            }
        ),
        RecordDict(
            {"m": MetricRecord({"num-examples": 10, "val-mse": 6.0, "val-mae-severe": 4.0})}
        ),
    ]
    out = aggregate_metrics(recs, "num-examples")
    assert out["val-mse"] == pytest.approx(3.0) and out["val-mae-severe"] == pytest.approx(4.0)
    assert out["num-examples"] == 40


def test_repo_pyproject_and_bundle_list_every_run_config_key():
    repo = tomllib.loads(Path(__file__).parents[1].joinpath("pyproject.toml").read_text())
    bundle = tomllib.loads(bundle_pyproject())
    defaults = run_config_defaults()
    assert repo["tool"]["flwr"]["app"]["config"] == defaults
    assert bundle["tool"]["flwr"]["app"]["config"] == defaults
    assert bundle["tool"]["flwr"]["app"]["fab-include"] == ["pyproject.toml"]


def test_norm_keys_cover_batchnorm_running_stats():
    model = create_method("concat").build_model(*_cfgs())
    keys = norm_state_keys(model)
    assert any(k.endswith("running_mean") for k in keys) and any(
        k.endswith("num_batches_tracked") for k in keys
    )


def _cfgs():
    cfg, _ = split_run_config(RUN_CONFIG)
    return cfg.model, cfg.data


DP_RUN = {**RUN_CONFIG, "method": "remdr_dp", "oct-view": "rnflt", "num-server-rounds": 4}


def test_private_training_reports_epsilon_and_the_site_owns_its_ledger(tiny_data, tmp_path):
    ledger = tmp_path / "hospA.jsonl"
    coordinator_says = {**DP_RUN, "dp-ledger": str(tmp_path / "elsewhere.jsonl")}
    ctx = _context(tiny_data, coordinator_says, ledger=str(ledger))
    init = _initial(DP_RUN)
    reply = app(_message(MessageType.TRAIN, init, {"server-round": 1}), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content["metrics"]
    entries = PrivacyLedger(ledger).entries()
    assert m["dp-epsilon"] == pytest.approx(entries[-1]["epsilon_cumulative"]) and m["dp-steps"]
    assert entries[-1]["site"] == "hospA" and entries[-1]["round"] == 1
    assert not (tmp_path / "elsewhere.jsonl").exists()  # the run config cannot move the ledger
    # the site's own ceiling wins over a higher one in the run config: round 2 is declined
    ctx = _context(
        tiny_data, coordinator_says, ledger=str(ledger), **{"epsilon-max": m["dp-epsilon"] * 1.1}
    )
    reply = app(_message(MessageType.TRAIN, init, {"server-round": 2}), ctx)
    assert reply.has_error() and reply.error.code == PRIVACY_DECLINED
    assert "privacy budget" in reply.error.reason and "hospA" in reply.error.reason
    assert len(PrivacyLedger(ledger).entries()) == 1


def test_a_site_that_requires_dp_declines_non_private_methods(tiny_data, tmp_path):
    ctx = _context(tiny_data, RUN_CONFIG, **{"require-dp": "true", "ledger": str(tmp_path / "l")})
    reply = app(_message(MessageType.TRAIN, _initial(RUN_CONFIG), {"server-round": 1}), ctx)
    assert reply.has_error() and reply.error.code == PRIVACY_DECLINED
    assert "require-dp" in reply.error.reason


def test_site_dp_wraps_the_strategy_and_needs_float_only_models():
    _, fed = split_run_config({"site-dp": "fixed", "group-norm": "true", "min-nodes": 3})
    s = build_strategy(fed)
    assert type(s.inner).__name__ == "DifferentialPrivacyServerSideFixedClipping"
    assert s.inner.strategy.weighted_by_key == "unit-weight"  # a plain mean of clipped updates
    with pytest.raises(ConfigError, match="group-norm"):
        split_run_config({"site-dp": "fixed", "group-norm": "false"})
    split_run_config({"site-dp": "fixed"})  # GroupNorm is the federated default
    with pytest.raises(ConfigError, match="strategy"):
        split_run_config({"site-dp": "adaptive", "group-norm": "true", "strategy": "krum"})
