"""Bad updates are named and refused before aggregation; the missing-site policy is applied."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.app import Metadata as FlwrMetadata
from remdr.server.app import RemdrStrategy, RoundAborted, build_strategy

from remdr.federation.run_config import split_run_config
from remdr.federation.screening import FAULTS, corrupt_update, fault_for_round, update_problem


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=gen),
        "b": torch.randn(3, generator=gen),
        "steps": torch.tensor(5),
    }


def _np(state):
    return {k: v.numpy() for k, v in state.items()}


@pytest.mark.parametrize("kind", FAULTS)
def test_every_drill_fault_is_refused_with_a_reason(kind):
    ref = _state()
    reason = update_problem(_np(corrupt_update(ref, kind)), _np(ref), max_norm=1e4)
    expected = {
        "nan": "non-finite",
        "inf": "non-finite",
        "shape": "wrong shape",
        "keys": "wrong keys",
        "norm": "exceeds the limit",
    }[kind]
    assert reason is not None and expected in reason


def test_a_normal_update_passes_also_after_fedavg_made_counters_float():
    ref = _state()
    moved = {k: (v + 0.01 if v.is_floating_point() else v + 7) for k, v in ref.items()}
    assert update_problem(_np(moved), _np(ref), max_norm=1.0) is None
    aggregated = {**_np(ref), "steps": np.float64(5.0) * np.ones(())}  # FedAvg's global
    assert update_problem(_np(moved), aggregated, max_norm=1.0) is None
    text = {**_np(moved), "w": np.array([["x"] * 3] * 4)}
    assert "wrong dtype" in update_problem(text, _np(ref), max_norm=1.0)


def test_fault_schedule_cycles_by_round():
    assert fault_for_round("", 3) is None
    assert [fault_for_round("nan,keys", r) for r in (1, 2, 3)] == ["nan", "keys", "nan"]


def _reply(node: int, state: dict, site: str) -> Message:
    meta = FlwrMetadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id=f"q{node}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(state),
            "metrics": MetricRecord({"num-examples": 10, "unit-weight": 1.0}),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return Message(content=content, metadata=meta)


def _strategy(**fed) -> RemdrStrategy:
    _, cfg = split_run_config({"min-nodes": 3, **fed})
    s = build_strategy(cfg)
    s.current = {"round": 1}
    s._global = _np(_state())
    s._sampled["train"] = [1, 2, 3]
    return s


def test_malformed_updates_are_dropped_before_the_inner_strategy_sees_them():
    s = _strategy()
    ok = {k: (v + 0.01 if v.is_floating_point() else v) for k, v in _state().items()}
    replies = [
        _reply(1, ok, "A"),
        _reply(2, corrupt_update(_state(), "nan"), "B"),
        _reply(3, corrupt_update(_state(), "keys"), "C"),
    ]
    arrays, _ = s.aggregate_train(1, replies)
    assert s.current["rejected"] == ["B", "C"] and s.current["aggregated"] == ["A"]
    reasons = {e["site"]: e["reason"] for e in s.current["errors"]}
    assert "non-finite" in reasons["B"] and "wrong keys" in reasons["C"]
    merged = arrays.to_torch_state_dict()
    assert all(torch.isfinite(v.float()).all() for v in merged.values())
    assert torch.allclose(merged["w"], ok["w"])


def test_all_updates_bad_keeps_the_global_model():
    s = _strategy()
    arrays, _ = s.aggregate_train(1, [_reply(1, corrupt_update(_state(), "inf"), "A")])
    assert arrays is None and s.current["rejected"] == ["A"]


def test_missing_site_policy():
    cont = _strategy()
    cont.aggregate_train(1, [_reply(1, _state(), "A"), _reply(2, _state(), "B")])
    assert cont.current["missing"] == {"train": ["node-3"]}
    abort = _strategy(**{"on-missing": "abort"})
    with pytest.raises(RoundAborted, match="no reply from node-3"):
        abort.aggregate_train(1, [_reply(1, _state(), "A"), _reply(2, _state(), "B")])


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def test_a_round_goes_on_with_the_connected_sites_after_node_wait():
    s = _strategy(**{"node-wait": 0.0})
    s.site_of_node = {1: "A", 2: "B", 3: "C"}
    s._cohort(_Grid([1, 2]))
    assert s.inner.min_train_nodes == s.inner.min_available_nodes == 2
    assert s.current["missing"]["connect"] == ["C"]
    s._cohort(_Grid([1, 2, 3]))  # C is back: the full cohort again
    assert s.inner.min_train_nodes == 3
    with pytest.raises(RoundAborted, match="2 of 3 sites connected"):
        _strategy(**{"node-wait": 0.0, "on-missing": "abort"})._cohort(_Grid([1, 2]))


def test_site_level_dp_noise_follows_the_real_cohort():
    s = _strategy(**{"node-wait": 0.0, "site-dp": "fixed", "group-norm": "true"})
    s._cohort(_Grid([1, 2]))
    assert s.inner.num_sampled_clients == 2 and s.inner.strategy.min_train_nodes == 2


def test_update_norm_is_of_the_change_not_the_weights():
    ref = {"w": np.full((10,), 100.0, dtype=np.float32)}
    assert update_problem({"w": ref["w"] + 0.1}, ref, max_norm=1.0) is None
