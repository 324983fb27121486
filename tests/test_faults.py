"""Bad updates are named and refused; the missing-site policy is applied; a site that left is
not waited for, one that is reconnecting is."""

from __future__ import annotations

import importlib
import time
import tomllib

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, RecordDict
from flwr.app import Metadata as FlwrMetadata
from remdr.client.fault_drill import FAULTS, corrupt_update, fault_for_round
from remdr.server.grid import NODE_UNAVAILABLE, RetryingGrid
from remdr.server.strategy import RemdrStrategy, RoundAborted, build_strategy
from replies import train_reply

from remdr.federation.app_bundle import bundle_pyproject
from remdr.federation.run_config import split_run_config
from remdr.federation.screening import update_problem


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


def test_a_normal_update_passes_and_one_of_another_dtype_does_not():
    ref = _state()
    moved = {k: (v + 0.01 if v.is_floating_point() else v + 7) for k, v in ref.items()}
    assert update_problem(_np(moved), _np(ref), max_norm=1.0) is None
    # the coordinator keeps the global model in the model's dtypes (counters stay integers),
    # so an honest site always matches it; an array of another dtype is refused
    floated = {**_np(moved), "steps": np.float64(12.0) * np.ones(())}
    assert "wrong dtype for steps" in update_problem(floated, _np(ref), max_norm=1.0)
    text = {**_np(moved), "w": np.array([["x"] * 3] * 4)}
    assert "wrong dtype" in update_problem(text, _np(ref), max_norm=1.0)


def test_only_the_drill_app_sends_a_drilled_sites_bad_update(tiny_data, monkeypatch):
    """With REMDR_FAULT_UPDATE set, the production ClientApp still sends a good update; the
    drill ClientApp sends the bad one the coordinator must refuse."""
    from remdr.client import fault_drill
    from site_app import app as production
    from site_app import over_the_wire
    from test_client_app import RUN_CONFIG, MessageType, _context, _initial, _message

    monkeypatch.setenv(fault_drill.FAULT_ENV, "nan")
    initial = _np(_initial(RUN_CONFIG))
    for app, problem in ((production, None), (over_the_wire(fault_drill.app), "non-finite")):
        msg = _message(MessageType.TRAIN, _initial(RUN_CONFIG), {"server-round": 1})
        reply = app(msg, _context(tiny_data, RUN_CONFIG))
        update = _np(reply.content["arrays"].to_torch_state_dict())
        reason = update_problem(update, initial, max_norm=0.0)
        assert reason is None if problem is None else problem in reason


def test_a_drill_bundle_names_the_drill_client_app_and_a_study_never_does():
    from remdr.client import fault_drill

    def clientapp(**kw) -> str:
        return tomllib.loads(bundle_pyproject(**kw))["tool"]["flwr"]["app"]["components"][
            "clientapp"
        ]

    assert clientapp() == "remdr.client.app:app"
    module, attr = clientapp(fault_drill=True).split(":")
    assert getattr(importlib.import_module(module), attr) is fault_drill.app


def test_fault_schedule_cycles_by_round():
    assert fault_for_round("", 3) is None
    assert [fault_for_round("nan,keys", r) for r in (1, 2, 3)] == ["nan", "keys", "nan"]


def _reply(node: int, state: dict, site: str) -> Message:
    return train_reply(node, ArrayRecord(state), site, {"num-examples": 10, "unit-weight": 1.0})


def _strategy(**fed) -> RemdrStrategy:
    _, cfg = split_run_config({"min-nodes": 3, "drift-control": "off", **fed})
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
    s.names.of_node = {1: "A", 2: "B", 3: "C"}
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


def _request(node: int) -> Message:
    meta = FlwrMetadata(
        run_id=1,
        message_id="",
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="2",
        created_at=time.time(),
        ttl=60.0,
        message_type="train",
    )
    return Message(content=RecordDict({"config": ConfigRecord({"x": 1})}), metadata=meta)


class _Federation:
    """A SuperLink's view: node 2 is unavailable to the first message sent to it; `listed` are
    the node ids `get_node_ids()` returns, one entry per call (the last one repeats). A reply
    becomes pullable only on the `late`-th pull after its push, as a site's training takes time."""

    def __init__(self, listed: list[list[int]], late: int = 1) -> None:
        self.listed, self.sent, self.late = listed, [], late
        self.queued: dict[str, tuple[int, Message]] = {}  # message id -> (pulls left, reply)

    def get_node_ids(self):
        return self.listed.pop(0) if len(self.listed) > 1 else self.listed[0]

    def push_messages(self, messages):
        messages = list(messages)
        self.sent.append([m.metadata.dst_node_id for m in messages])
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # as Flower's push_messages does
            if m.metadata.dst_node_id == 2 and len(self.sent) == 1:
                reply = Message(Error(code=NODE_UNAVAILABLE, reason="no heartbeat"), reply_to=m)
            else:
                reply = Message(RecordDict(), reply_to=m)
            self.queued[m.object_id] = (self.late, reply)
        return [m.object_id for m in messages]

    def pull_messages(self, message_ids):
        ready = []
        for mid in list(message_ids):
            left, reply = self.queued[mid]
            if left <= 1:
                ready.append(self.queued.pop(mid)[1])
            else:
                self.queued[mid] = (left - 1, reply)
        return ready


def test_a_reconnecting_site_is_sent_its_message_again(in_a_run):
    """Right after the ServerApp starts (a SuperLink restart) node 2 is unavailable and not
    listed: it is still reconnecting, so the grid waits until Flower lists it again and resends."""
    link = _Federation(listed=[[1], [1], [1, 2]], late=3)
    grid = RetryingGrid(link, reconnect_window=30.0, poll=0.01, reply_poll=0.01)
    replies = grid.send_and_receive([_request(1), _request(2)], timeout=60)
    assert link.sent == [[1, 2], [2]]
    assert [r.has_error() for r in replies] == [False, False]
    assert sorted(grid.dst_of_message[r.metadata.reply_to_message_id] for r in replies) == [1, 2]


def test_a_site_that_left_is_reported_at_once(in_a_run):
    """Later in the run, an unavailable node Flower no longer lists has left: no resend, no wait."""
    link = _Federation(listed=[[1]])
    grid = RetryingGrid(link, reconnect_window=0.0, poll=10.0)
    start = time.monotonic()
    replies = grid.send_and_receive([_request(1), _request(2)], timeout=300)
    assert time.monotonic() - start < 1.0 and link.sent == [[1, 2]]
    errors = [r for r in replies if r.has_error()]
    assert [grid.dst_of_message[e.metadata.reply_to_message_id] for e in errors] == [2]
    assert errors[0].error.code == NODE_UNAVAILABLE


def test_a_site_that_does_not_come_back_within_the_window_is_reported(in_a_run):
    link = _Federation(listed=[[1]])
    grid = RetryingGrid(link, reconnect_window=0.2, poll=0.01)
    replies = grid.send_and_receive([_request(2)], timeout=300)
    assert link.sent == [[2]] and replies[0].error.code == NODE_UNAVAILABLE
