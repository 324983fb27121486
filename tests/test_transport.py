"""The model crosses Flower's links as one packed array: exact both ways, and a bad blob from
either party is refused with a one-line reason, never a traceback."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
from conftest import TINY
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from remdr.client.app import SITE_ERROR
from remdr.client.app import app as production
from remdr.server.grid import UNREADABLE_REPLY, RetryingGrid
from safetensors.numpy import save as save_safetensors
from test_client_app import RUN_CONFIG, MessageType, _context, _initial, _message
from test_faults import _request

from remdr.federation.run_config import split_run_config
from remdr.federation.transport import (
    PACKED,
    TransportError,
    pack,
    pack_records,
    unpack,
    unpack_records,
)
from remdr.methods import build_model


def _model_state() -> dict[str, np.ndarray]:
    cfg, _ = split_run_config({**RUN_CONFIG, **TINY, "method": "remdr"})
    return {k: v.numpy() for k, v in build_model(cfg).state_dict().items()}


def test_a_models_arrays_come_back_exactly_in_order_dtype_and_shape():
    state = _model_state()
    state["steps"] = np.array(12, dtype=np.int64)  # a 0-d counter, which safetensors widens
    state["mask"] = np.array([True, False])
    state["empty"] = np.zeros((0, 3), dtype=np.float32)
    state["strided"] = np.arange(12, dtype=np.float64).reshape(3, 4).T  # not C-contiguous
    back = unpack(pack(state))
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].dtype == value.dtype and back[name].shape == value.shape, name
        assert np.array_equal(back[name], value), name


def test_each_array_record_travels_as_one_array_and_other_records_unchanged():
    state = {k: Array(v) for k, v in _model_state().items()}
    control = {"c.w": Array(np.ones((2, 2), np.float32)), "c.b": Array(np.zeros(2, np.float32))}
    content = RecordDict(
        {
            "arrays": ArrayRecord(OrderedDict(state)),
            "control": ArrayRecord(OrderedDict(control)),
            "config": ConfigRecord({"server-round": 3}),
            "metrics": MetricRecord({"num-examples": 5}),
        }
    )
    packed = pack_records(content)
    assert [list(packed[k].keys()) for k in ("arrays", "control")] == [[PACKED], [PACKED]]
    assert packed["config"]["server-round"] == 3 and packed["metrics"]["num-examples"] == 5
    back = unpack_records(packed)
    for name in ("arrays", "control"):
        assert list(back[name].keys()) == list(content[name].keys())
    assert unpack_records(content)["arrays"].keys() == content["arrays"].keys()  # not packed


def _blob(tensors: dict, order) -> np.ndarray:
    meta = {"remdr-order": order if isinstance(order, str) else json.dumps(order)}
    return np.frombuffer(save_safetensors(tensors, metadata=meta), dtype=np.uint8)


W = np.ones((2, 3), np.float32)
GOOD = pack({"w": W})


@pytest.mark.parametrize(
    "blob, reason",
    [
        (GOOD[:-5], "not valid safetensors"),
        (GOOD[:20], "larger than the record"),
        (np.frombuffer(b"\xff" * 8 + b"{}", np.uint8), "larger than the record"),
        (np.frombuffer(b"abc", np.uint8), "shorter than"),
        (GOOD.astype(np.int32), "not one flat byte array"),
        (GOOD.reshape(1, -1), "not one flat byte array"),
        (np.frombuffer(save_safetensors({"w": W}), np.uint8), "no readable name list"),
        (_blob({"w": W}, [["w", [2, 3]], ["v", [1]]]), "does not match its arrays"),
        (_blob({"w": W}, [["w", [2, 3]], ["w", [6]]]), "twice"),
        (_blob({"w": W}, [["w", [4, 3]]]), "does not fit its data"),
        (_blob({"w": W}, [["w", [-2, -3]]]), "names with shapes"),
        (_blob({"w": W}, {"w": [2, 3]}), "names with shapes"),
        (_blob({"w": W}, [["w", [2.0, 3]]]), "names with shapes"),
        (_blob({"w": W}, [["w", [True, 3]]]), "names with shapes"),
        (_blob({"w": W}, [[7, [2, 3]]]), "names with shapes"),
        (_blob({"w": W}, [["w", [2, 3], "x"]]), "names with shapes"),
        (_blob({"w": W}, [["w", "23"]]), "names with shapes"),
        (_blob({"w": W}, [["w", [6] + [1] * 64]]), "names with shapes"),
        (_blob({"w": W}, '[["w", [1e400]]]'), "names with shapes"),
        (_blob({"e": np.zeros(0, np.float32)}, [["e", [2**32, 2**32]]]), "does not fit"),
        (_blob({"e": np.zeros(0, np.float32)}, [["e", [0, 2**63]]]), "does not fit"),
    ],
)
def test_a_bad_blob_is_refused_with_a_reason(blob, reason):
    with pytest.raises(TransportError, match=reason) as err:
        unpack(blob)
    assert "\n" not in str(err.value)


def test_the_fault_drill_sends_its_bad_update_packed_once(tiny_data, monkeypatch):
    from remdr.client.fault_drill import FAULT_ENV
    from remdr.client.fault_drill import app as drill

    from remdr.federation import transport

    monkeypatch.setenv(FAULT_ENV, "nan")
    msg = _message(MessageType.TRAIN, _initial(RUN_CONFIG), {"server-round": 1})
    msg.content = pack_records(msg.content)
    calls = {"pack": 0, "unpack": 0}
    for name in calls:
        real = getattr(transport, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(transport, name, counted)
    reply = drill(msg, _context(tiny_data, RUN_CONFIG))
    monkeypatch.undo()
    assert calls == {"pack": 1, "unpack": 1}  # the model in, the bad update out
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert list(reply.content["arrays"].keys()) == [PACKED]
    sent = unpack_records(reply.content)["arrays"]
    assert not all(np.isfinite(a.numpy()).all() for a in sent.values())


def test_a_record_mixing_a_blob_with_arrays_is_refused():
    record = ArrayRecord(OrderedDict([(PACKED, Array(GOOD)), ("w", Array(W))]))
    with pytest.raises(TransportError, match="mixes"):
        unpack_records(RecordDict({"arrays": record}))


def test_the_client_app_replies_packed_and_refuses_an_unreadable_message(tiny_data):
    initial = _initial(RUN_CONFIG)
    msg = _message(MessageType.TRAIN, initial, {"server-round": 1})
    msg.content = pack_records(msg.content)
    reply = production(msg, _context(tiny_data, RUN_CONFIG))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert list(reply.content["arrays"].keys()) == [PACKED]
    assert unpack_records(reply.content)["arrays"].keys() == initial.keys()

    bad = _message(MessageType.TRAIN, initial, {"server-round": 1})
    bad.content["arrays"] = ArrayRecord(OrderedDict([(PACKED, Array(GOOD[:20]))]))
    refused = production(bad, _context(tiny_data, RUN_CONFIG))
    assert refused.has_error() and refused.error.code == SITE_ERROR
    assert "unreadable" in refused.error.reason and "hospA" in refused.error.reason


class _Link:
    """A SuperLink's view that answers node 1 with a good packed model and node 2 with a
    broken blob, and keeps what it was sent."""

    def __init__(self) -> None:
        self.pushed: list[Message] = []
        self.replies: list[Message] = []

    def get_node_ids(self):
        return [1, 2]

    def push_messages(self, messages):
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            self.pushed.append(m)
            blob = GOOD if m.metadata.dst_node_id == 1 else GOOD[:-5]
            arrays = ArrayRecord(OrderedDict([(PACKED, Array(blob))]))
            self.replies.append(Message(RecordDict({"arrays": arrays}), reply_to=m))
        return [m.object_id for m in messages]

    def pull_messages(self, message_ids):
        ready, self.replies = self.replies, []
        return ready


def test_the_grid_sends_packed_and_names_a_site_whose_reply_is_unreadable(in_a_run):
    link = _Link()
    grid = RetryingGrid(link, reply_poll=0.01)
    requests = [_request(1), _request(2)]
    for r in requests:
        r.content["arrays"] = ArrayRecord(OrderedDict([("w", Array(W)), ("b", Array(W[0]))]))
    replies = grid.send_and_receive(requests, timeout=10)
    assert all(list(m.content["arrays"].keys()) == [PACKED] for m in link.pushed)
    by_node = {grid.dst_of_message[r.metadata.reply_to_message_id]: r for r in replies}
    assert np.array_equal(by_node[1].content["arrays"]["w"].numpy(), W)
    assert by_node[2].has_error() and by_node[2].error.code == UNREADABLE_REPLY
    assert "unreadable reply" in by_node[2].error.reason
