"""SCAFFOLD's control variates: the site's correction, its state, and the coordinator's c."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY
from flwr.app import ConfigRecord
from remdr.server.drift_control import CONTROL, ServerControl
from remdr.server.strategy import build_strategy
from replies import train_reply
from site_app import app
from test_federation_rounds import _context, _initial, _message
from test_site_dp import ArrayRecord, _Grid

from remdr.errors import ConfigError
from remdr.federation.run_config import run_config_defaults, split_run_config
from remdr.optim import DriftControl

RUN_CONFIG = {
    **run_config_defaults(), **TINY, "local-steps": 3, "num-server-rounds": 3,
    "drift-control": "scaffold",
}  # fmt: skip


def test_a_corrected_step_adds_the_federations_minus_the_sites_mean_gradient():
    model = torch.nn.Linear(3, 1, bias=False)
    server = {"weight": torch.tensor([[1.0, 0.0, -1.0]])}
    local = {"weight": torch.tensor([[0.5, 0.5, 0.5]])}
    control = DriftControl(model, server, local)
    grads = [torch.tensor([[2.0, 0.0, 4.0]]), torch.tensor([[0.0, 2.0, 0.0]])]
    for g in grads:
        model.weight.grad = g.clone()
        control.observe()
        control.correct()
        torch.testing.assert_close(model.weight.grad, g + server["weight"] - local["weight"])
    # c_i after the round: the mean of the raw gradients, not of the corrected ones
    torch.testing.assert_close(control.updated_local()["weight"], torch.tensor([[1.0, 1.0, 2.0]]))
    untouched = DriftControl(model, server, local)  # no step saw a gradient: c_i stays
    torch.testing.assert_close(untouched.updated_local()["weight"], local["weight"])


def test_the_site_keeps_its_control_variate_and_sends_only_its_change(tiny_data):
    initial = _initial(RUN_CONFIG)
    context = _context(tiny_data, RUN_CONFIG)
    first = app(_message("train", initial, 1), context)
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    delta1 = first.content[CONTROL].to_torch_state_dict()
    cfg, _ = split_run_config(RUN_CONFIG)
    from remdr.methods import build_model

    trainable = {n for n, p in build_model(cfg).named_parameters() if p.requires_grad}
    assert set(delta1) == trainable  # parameters only, no buffers
    assert any(v.abs().sum() > 0 for v in delta1.values())
    kept = context.state[CONTROL].to_torch_state_dict()  # c_i: round 1 started from zero
    assert all(torch.equal(kept[k], delta1[k]) for k in kept)
    second = app(_message("train", initial, 2), context)
    delta2 = second.content[CONTROL].to_torch_state_dict()
    new = context.state[CONTROL].to_torch_state_dict()
    assert all(torch.allclose(new[k], kept[k] + delta2[k], atol=1e-6) for k in new)


def test_the_coordinator_sends_c_and_folds_in_the_example_weighted_changes(in_a_run):
    _, fed = split_run_config({"drift-control": "scaffold", "min-nodes": 2, "node-wait": 0.0})
    strategy = build_strategy(fed, {"w": (4,)})
    g = {"w": np.zeros(4, np.float32)}
    msgs = strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), _Grid([1, 2]))
    assert all(np.array_equal(m.content[CONTROL]["w"].numpy(), np.zeros(4)) for m in msgs)

    def reply(node, delta, n):
        r = train_reply(node, ArrayRecord({"w": np.full(4, float(node), np.float32)}), f"s{node}",
                        {"num-examples": n, "unit-weight": 1.0})  # fmt: skip
        if delta is not None:
            r.content[CONTROL] = ArrayRecord({"w": delta})
        return r

    replies = [reply(1, np.ones(4, np.float32), 30), reply(2, np.full(4, 4.0, np.float32), 10)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and set(arrays) == {"w"}  # the control never reaches FedAvg
    np.testing.assert_allclose(strategy.control.c["w"], (30 * 1 + 10 * 4) / 40)
    # the next round's message carries the new c; it survives the strategy's checkpoint
    msgs = strategy.configure_train(2, arrays, ConfigRecord(), _Grid([1, 2]))
    np.testing.assert_allclose(msgs[0].content[CONTROL]["w"].numpy(), 1.75)
    state, _ = strategy.state_dict()
    again = build_strategy(fed, {"w": (4,)})
    again.load_state_dict(state, {})
    np.testing.assert_array_equal(again.control.c["w"], strategy.control.c["w"])


@pytest.mark.parametrize(
    "delta, reason",
    [
        (None, "no control variate"),
        (np.full(4, np.nan, np.float32), "non-finite"),
        (np.ones(3, np.float32), "shape"),
        (np.ones(4, np.int64), "dtype"),
        (np.full(4, 1e9, np.float32), "exceeds max-update-norm"),
    ],
)
def test_a_bad_control_variate_rejects_the_reply_and_leaves_c(in_a_run, delta, reason):
    _, fed = split_run_config({"drift-control": "scaffold", "min-nodes": 2, "node-wait": 0.0})
    strategy = build_strategy(fed, {"w": (4,)})
    g = {"w": np.zeros(4, np.float32)}
    strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), _Grid([1, 2]))
    good = train_reply(1, ArrayRecord(g), "A", {"num-examples": 5, "unit-weight": 1.0})
    good.content[CONTROL] = ArrayRecord({"w": np.ones(4, np.float32)})
    bad = train_reply(2, ArrayRecord(g), "B", {"num-examples": 5, "unit-weight": 1.0})
    if delta is not None:
        bad.content[CONTROL] = ArrayRecord({"w": delta})
    strategy.aggregate_train(1, [good, bad])
    assert strategy.current["rejected"] == ["B"]
    assert reason in strategy.current["errors"][0]["reason"]
    np.testing.assert_array_equal(strategy.control.c["w"], np.ones(4))  # A's change only


def test_drift_control_is_refused_where_it_would_break_a_guarantee():
    for keys in ({"method": "remdr_dp"}, {"site-dp": "fixed", "group-norm": True},
                 {"strategy": "krum"}):  # fmt: skip
        with pytest.raises(ConfigError, match="drift-control=scaffold"):
            split_run_config({"drift-control": "scaffold", **keys})


def test_server_control_ignores_state_of_unknown_parameters():
    control = ServerControl({"w": (2,)})
    control.load_state_dict({"control/w": np.ones(2), "control/gone": np.ones(3), "m_t/w": 5})
    np.testing.assert_array_equal(control.c["w"], np.ones(2))
    assert set(control.c) == {"w"}


def test_c_stays_finite_whatever_changes_the_sites_send(in_a_run):
    """Without a norm limit (max-update-norm 0) finite changes can still sum past float32:
    c then stays as it was, so no site is sent an infinite correction."""
    run = {"drift-control": "scaffold", "min-nodes": 2, "node-wait": 0.0, "max-update-norm": 0.0}
    strategy = build_strategy(split_run_config(run)[1], {"w": (4,)})
    g = {"w": np.zeros(4, np.float32)}
    for r in (1, 2):
        strategy.configure_train(r, ArrayRecord(g), ConfigRecord(), _Grid([1, 2]))
        replies = []
        for node in (1, 2):
            reply = train_reply(node, ArrayRecord(g), f"s{node}", {"num-examples": 5})
            reply.content[CONTROL] = ArrayRecord({"w": np.full(4, 3e38, np.float32)})
            replies.append(reply)
        strategy.aggregate_train(r, replies)
    assert np.isfinite(strategy.control.c["w"]).all()
    np.testing.assert_array_equal(strategy.control.c["w"], np.full(4, 3e38, np.float32))
