"""A coordinator restart continues the run it left: server strategy state, each site's
cross-round state, the same training config, and every site-level DP release counted once.

Fast: the strategy is driven directly with constructed Messages and the ClientApp's handlers are
called with two Flower run ids (a resumed run is a new Flower run); the slow end-to-end resume
through real processes is in test_federation_e2e.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from remdr.server.app import resume_point, resumed_strategy
from remdr.server.site_dp import site_level_privacy
from site_app import app
from test_client_app import RUN_CONFIG, _initial, _message
from test_site_dp import ArrayRecord, _Grid, _reply

from remdr.errors import ConfigError
from remdr.federation.run_config import split_run_config
from remdr.federation.run_directory import RunDirectory

FEDADAM = {**RUN_CONFIG, "strategy": "fedadam", "min-nodes": 3, "node-wait": 0.0}
SHAPES = {"w": (6, 5), "b": (5,)}


def _site_update(arrays: dict[str, np.ndarray], node: int, rnd: int) -> dict[str, np.ndarray]:
    """A site's deterministic 'training': pulls the global model towards its own optimum."""
    gen = np.random.default_rng(100 * node + rnd)
    return {
        k: (0.7 * v + 0.3 * gen.normal(node, 1.0, v.shape)).astype(np.float32)
        for k, v in sorted(arrays.items())
    }


def _rounds(strategy, arrays: dict[str, np.ndarray], rounds: int) -> dict[str, np.ndarray]:
    for r in range(1, rounds + 1):
        msgs = strategy.configure_train(r, ArrayRecord(arrays), ConfigRecord(), _Grid([1, 2, 3]))
        nodes = sorted(m.metadata.dst_node_id for m in msgs)  # a fixed order: exact sums
        replies = [
            _reply(n, _site_update(arrays, n, r + strategy.round_offset), f"s{n}") for n in nodes
        ]
        new, _ = strategy.aggregate_train(r, replies)
        arrays = {k: np.asarray(v.numpy()) for k, v in new.items()}
    return arrays


def test_fedadam_resume_continues_the_server_moments_exactly(in_a_run, tmp_path):
    """2 rounds, checkpoint, a fresh coordinator resumes, 1 round == 3 rounds uninterrupted."""
    _, fed = split_run_config(FEDADAM)
    start = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    whole = resumed_strategy(fed, RunDirectory(tmp_path / "whole"), 0)
    expected = _rounds(whole, start, 3)

    run = RunDirectory(tmp_path / "run")
    first = resumed_strategy(fed, run, 0)
    after_two = _rounds(first, start, 2)
    weights = {k: torch.from_numpy(v) for k, v in after_two.items()}
    run.save_round(2, weights, {"config": FEDADAM}, first.state_dict())  # as the ServerApp does

    done = resume_point(run, FEDADAM)
    resumed = resumed_strategy(fed, run, done)
    loaded = {k: v.numpy() for k, v in run.load_weights(done).items()}
    got = _rounds(resumed, loaded, 1)
    for k in SHAPES:
        np.testing.assert_array_equal(got[k], expected[k])
        np.testing.assert_array_equal(resumed.inner.m_t[k], whole.inner.m_t[k])
        np.testing.assert_array_equal(resumed.inner.v_t[k], whole.inner.v_t[k])
    # what a coordinator without the saved state would have done: not the same run
    naive = resumed_strategy(fed, RunDirectory(tmp_path / "naive"), 0)
    naive.round_offset = 2
    assert not np.allclose(_rounds(naive, loaded, 1)["w"], expected["w"])


def test_adaptive_clipping_norm_is_restored(tmp_path):
    config = {
        **RUN_CONFIG, "site-dp": "adaptive", "site-dp-noise": 0.1, "group-norm": True,
        "min-nodes": 3,
    }  # fmt: skip
    _, fed = split_run_config(config)
    run = RunDirectory(tmp_path / "run")
    strategy = resumed_strategy(fed, run, 0)
    strategy.inner.clipping_norm = 0.37
    state = {"w": torch.zeros(2)}
    run.save_round(1, state, {"config": config}, strategy.state_dict())
    assert resumed_strategy(fed, run, resume_point(run, config)).inner.clipping_norm == 0.37


def test_resume_refuses_a_changed_training_config_in_one_line(tmp_path):
    run = RunDirectory(tmp_path / "run")
    saved = {**RUN_CONFIG, "num-server-rounds": 3}
    run.save_round(2, {"w": torch.zeros(2)}, {"config": saved})
    harmless = {**saved, "num-server-rounds": 6, "round-timeout": 5.0, "node-wait": 1.0}
    assert resume_point(run, harmless) == 2
    with pytest.raises(ConfigError) as err:
        resume_point(run, {**harmless, "lr": 0.5, "strategy": "fedprox"})
    line = str(err.value)
    assert "\n" not in line and "lr" in line and "strategy" in line
    assert (
        "round-timeout" not in line.split("(fix")[0]
        and "num-server-rounds" not in line.split("(fix")[0]
    )
    with pytest.raises(ConfigError, match="num-server-rounds 3 -> 1"):
        resume_point(run, {**saved, "num-server-rounds": 1})


def test_a_release_made_before_a_crash_is_counted_once_and_the_redo_too(in_a_run, tmp_path):
    """Round 1 is aggregated and noised (and sent to the sites for evaluation), then the
    coordinator dies before the checkpoint; the resumed coordinator redoes round 1: two
    releases were made, two are accounted, each once."""
    config = {**RUN_CONFIG, "site-dp": "fixed", "group-norm": True, "min-nodes": 2}
    _, fed = split_run_config(config)
    run = RunDirectory(tmp_path / "run")
    start = {"w": np.zeros(4, np.float32)}

    def one_round(strategy):
        strategy.configure_train(1, ArrayRecord(start), ConfigRecord(), _Grid([1, 2]))
        replies = [_reply(n, {"w": np.full(4, 0.1, np.float32)}, f"s{n}") for n in (1, 2)]
        return strategy.aggregate_train(1, replies)[0]

    one_round(resumed_strategy(fed, run, resume_point(run, config)))  # then the crash
    assert run.last_round() == 0 and len(run.releases()) == 1
    again = resumed_strategy(fed, run, resume_point(run, config))
    arrays = one_round(again)
    state = {k: torch.from_numpy(np.array(v.numpy())) for k, v in arrays.items()}
    run.save_round(1, state, {"config": config, **again.current}, again.state_dict())
    assert site_level_privacy(fed, run.releases())["releases"] == 2
    assert [r["round"] for r in run.releases()] == [1, 1]


def _context(tiny_data, run_config, run_id: int, ledger) -> Context:
    node = {"data-path": str(tiny_data), "site-id": "hospA", "ledger": str(ledger)}
    return Context(run_id, 7, node, RecordDict(), run_config)


def test_fedbn_site_keeps_its_local_layers_across_a_coordinator_restart(tiny_data, tmp_path):
    """Round 1 in Flower run 1; the coordinator restarts (Flower run 2, empty context.state):
    the site still evaluates and trains with the norm layers its round 1 left."""
    run_config = {**RUN_CONFIG, "method": "concat", "fedbn": True, "out-dir": "runs/study-a"}
    initial = _initial(run_config)
    ledger = tmp_path / "hospA" / "privacy-ledger.jsonl"
    first = _context(tiny_data, run_config, 1, ledger)
    reply = app(_message(MessageType.TRAIN, initial, {"server-round": 1}), first)
    assert not reply.has_error()
    # a global model whose norm layers are not this site's (the site's own reply carries them)
    new_global = initial

    def val_mse(ctx, config=None) -> float:
        msg = _message(MessageType.EVALUATE, new_global, {"server-round": 1, **(config or {})})
        return app(msg, ctx).content["metrics"]["val-mse"]

    before_restart = val_mse(first)
    restarted = _context(tiny_data, run_config, 2, ledger)
    assert val_mse(restarted) == before_restart
    # another coordinator run (another run key) does not see this run's layers
    other = val_mse(_context(tiny_data, run_config, 3, ledger), {"remdr-run": "other-0000"})
    assert other != before_restart
    # and the restarted run's round 2 trains from the same site state as an uninterrupted one
    msg = _message(MessageType.TRAIN, new_global, {"server-round": 2})
    resumed = app(msg, restarted).content["arrays"].to_torch_state_dict()
    msg = _message(MessageType.TRAIN, new_global, {"server-round": 2})
    uninterrupted = app(msg, first).content["arrays"].to_torch_state_dict()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
