"""What makes a federated round cheap and federated training progress like centralized training:
one schedule across rounds, the site's optimiser kept between rounds, one message per round
(the site scores the model it receives), and the site's decoded data cached on its disk."""

from __future__ import annotations

import os
import time

import pytest
import torch
from conftest import TINY
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, RecordDict
from site_app import app

from remdr.config import ExperimentConfig, TrainConfig, apply_overrides
from remdr.federation.run_config import run_config_defaults, split_run_config
from remdr.federation.run_directory import RunDirectory
from remdr.federation.site_round import load_site
from remdr.federation.site_state import (
    Carried,
    SiteState,
    flatten_optimizer,
    unflatten_optimizer,
)
from remdr.methods import build_model
from remdr.train import lr_at

RUN_CONFIG = {**run_config_defaults(), **TINY, "local-epochs": 1, "num-server-rounds": 3}


def _message(kind: str, arrays: dict, server_round: int) -> Message:
    meta = Metadata(
        run_id=1, message_id="m1", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id=str(server_round), created_at=time.time(), ttl=3600.0, message_type=kind,
    )  # fmt: skip
    content = RecordDict(
        {"arrays": ArrayRecord(arrays), "config": ConfigRecord({"server-round": server_round})}
    )
    return Message(content=content, metadata=meta)


def _context(data, run_config: dict, **node) -> Context:
    return Context(
        run_id=1,
        node_id=7,
        node_config={"data-path": str(data), "site-id": "hospA", **node},
        state=RecordDict(),
        run_config=run_config,
    )


def _initial(run_config: dict) -> dict[str, torch.Tensor]:
    cfg, _ = split_run_config(run_config)
    torch.manual_seed(0)
    return build_model(cfg).state_dict()


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_rounds_follow_one_learning_rate_schedule(schedule):
    """Round r of R covers ((r-1)/R, r/R) of one schedule: the rounds' learning rates joined
    are the schedule of one training of R times the steps (one warm-up, one decay)."""
    cfg = TrainConfig(lr=1.0, schedule=schedule)
    whole = [lr_at(s, 8 * 12, cfg) for s in range(8 * 12)]
    joined = [lr_at(s, 12, cfg, (r / 8, (r + 1) / 8)) for r in range(8) for s in range(12)]
    assert joined == pytest.approx(whole)
    if schedule == "cosine":
        assert joined[-1] < 0.1 and max(joined) == pytest.approx(1.0, abs=0.01)


def test_the_train_reply_scores_the_model_the_site_received(tiny_data):
    """One message per round: the train reply carries the site's validation of the global
    model it was sent, the numbers an evaluate message would have returned for it."""
    initial = _initial(RUN_CONFIG)
    train = app(_message(MessageType.TRAIN, initial, 2), _context(tiny_data, RUN_CONFIG))
    assert not train.has_error(), train.error.reason if train.has_error() else ""
    evaluate = app(_message(MessageType.EVALUATE, initial, 2), _context(tiny_data, RUN_CONFIG))
    got, want = train.content["metrics"], evaluate.content["metrics"]
    assert got["received-val-mse"] == pytest.approx(want["val-mse"], rel=1e-5)
    assert got["received-num-val"] == want["num-val"] > 0
    assert "val-mse" not in got  # the trained model is scored by the next round, not twice
    checked = {**RUN_CONFIG, "local-validation": True}  # the drift diagnostic, on request
    local = app(_message(MessageType.TRAIN, initial, 2), _context(tiny_data, checked))
    metrics = local.content["metrics"]
    assert metrics["val-mse"] != pytest.approx(metrics["received-val-mse"])  # trained: moved on
    separate = {**RUN_CONFIG, "separate-evaluate": True}
    plain = app(_message(MessageType.TRAIN, initial, 2), _context(tiny_data, separate))
    assert not any(k.startswith("received-") for k in plain.content["metrics"])


@pytest.mark.parametrize("keep", [True, False])
def test_a_site_resumes_its_optimiser_moments_only_when_asked(tiny_data, keep):
    """Round 2 from the same global weights: a site that kept its AdamW moments from round 1
    trains to different weights than a fresh site; with keep-site-optimizer=false, the same."""
    # concat: no other state crosses rounds (remdr also carries its modality scores)
    run_config = {
        **RUN_CONFIG,
        "method": "concat",
        "optimizer": "adamw",
        "keep-site-optimizer": keep,
    }
    initial = _initial(run_config)
    veteran = _context(tiny_data, run_config)
    app(_message(MessageType.TRAIN, initial, 1), veteran)
    assert ("optimizer" in veteran.state) is keep
    second = app(_message(MessageType.TRAIN, initial, 2), veteran)
    fresh = app(_message(MessageType.TRAIN, initial, 2), _context(tiny_data, run_config))
    a = second.content["arrays"].to_torch_state_dict()
    b = fresh.content["arrays"].to_torch_state_dict()
    same = all(torch.equal(a[k], b[k]) for k in a)
    assert same is not keep


def test_with_local_steps_every_site_takes_that_many_steps_whatever_its_size(tmp_path):
    """A 12-eye and a 40-eye site (batch 8: 2 and 5 batches a pass) both take exactly 7 steps:
    the small one over several passes, the large one within two."""
    from remdr.data.synthetic import SyntheticSpec, generate

    run_config = {**RUN_CONFIG, "local-steps": 7}
    steps = {}
    for n in (12, 40):
        generate(tmp_path / str(n), SyntheticSpec(n=n, size=32, depth=6, n_sites=1, seed=n))
        reply = app(_message(MessageType.TRAIN, _initial(run_config), 1),
                    _context(tmp_path / str(n), run_config))  # fmt: skip
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        steps[n] = reply.content["metrics"]["train-steps"]
    assert steps == {12: 7, 40: 7}
    plain = app(
        _message(MessageType.TRAIN, _initial(RUN_CONFIG), 1), _context(tmp_path / "40", RUN_CONFIG)
    )
    assert plain.content["metrics"]["train-steps"] != 7  # one epoch of the 40-eye site


def test_a_sites_carried_state_survives_its_disk(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = opt.state_dict()
    store = SiteState(tmp_path, "run-1")
    control = {"weight": torch.full((2, 3), 0.5)}
    store.save(1, Carried({"scores": {}}, {"norm.weight": torch.ones(2)}, state, control))
    carried = store.load(before=2)
    assert carried.method == {"scores": {}} and set(carried.local) == {"norm.weight"}
    assert set(carried.control) == {"weight"} and torch.equal(
        carried.control["weight"], control["weight"]
    )
    back = carried.optimizer
    assert back["param_groups"] == state["param_groups"]
    assert store.load(before=1) == Carried()  # nothing before the first round
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            assert torch.equal(back["state"][idx][name], value)
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fresh.load_state_dict(unflatten_optimizer(*flatten_optimizer(state)))
    assert fresh.state_dict()["state"][0]["exp_avg"].equal(state["state"][0]["exp_avg"])


def test_the_sites_decoded_data_is_cached_on_its_disk_until_a_file_changes(
    tiny_data, tmp_path, monkeypatch
):
    cfg = apply_overrides(ExperimentConfig(), TINY)
    cache = tmp_path / "cache"
    monkeypatch.setenv("REMDR_CACHE", str(cache))
    first = load_site(tiny_data, cfg, cache=True)
    files = list((cache / "preprocessed").glob("*.safetensors"))
    assert len(files) == 1
    again = load_site(tiny_data, cfg, cache=True)
    assert len(again.train._cache) == len(again.train)  # filled from disk, nothing decoded
    plain = load_site(tiny_data, cfg)
    for i in range(len(plain.train)):
        assert torch.equal(again.train[i]["oct"], first.train[i]["oct"])
        assert torch.allclose(again.train[i]["oct"], plain.train[i]["oct"], atol=1e-2)
    # a file rewritten at the site: a new key, the old tensors are never read and are removed
    changed = first.train.records[0].path
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    load_site(tiny_data, cfg, cache=True)
    after = list((cache / "preprocessed").glob("*.safetensors"))
    assert len(after) == 1 and after != files
    # another image size is another key
    small = apply_overrides(ExperimentConfig(), {**TINY, "image-size": 16})
    assert load_site(tiny_data, small, cache=True).train[0]["oct"].shape[-1] == 16


def test_a_late_validation_can_move_the_best_model(tmp_path):
    run = RunDirectory(tmp_path)
    run.save_round(1, {"w": torch.zeros(1)}, {"sites": {"A": {"num-examples": 3}}})
    run.save_round(2, {"w": torch.ones(1)}, {"sites": {"A": {"num-examples": 3}}})
    assert not (tmp_path / "best.safetensors").exists()  # no round scored yet
    run.add_evaluation(2, {"val-mse": 4.0}, {"A": {"eval-val-mse": 4.0}})
    run.add_evaluation(1, {"val-mse": 3.0}, {"A": {"eval-val-mse": 3.0}})
    assert run.record(1)["sites"]["A"] == {"num-examples": 3, "eval-val-mse": 3.0}
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "best.safetensors"))["w"].item() == 0.0
    assert run.best_val_mse() == 3.0
