"""Sites with one modality: each part of the model is aggregated over the sites that trained it,
weighted by their eyes; a site sends untrained parts back as received, and screening holds it
to that."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message
from remdr.server.part_aggregation import aggregate_part
from remdr.server.strategy import BASES, RemdrStrategy, build_strategy
from replies import train_reply

from remdr.data.dataset import EyeDataset
from remdr.federation.run_config import split_run_config
from remdr.federation.screening import counts_problem, trained_counts, untrained_part_problem
from remdr.federation.site_round import eye_counts, load_site, restore_untrained, train_round
from remdr.model import model_part

STRATEGIES = sorted(BASES)
# one array per part (keys as the model names them), plus an integer BatchNorm counter
SHAPES = {
    "branches.oct.encoder.w": (4, 3),
    "heads.oct.0.bias": (3,),
    "branches.fundus.encoder.w": (4, 3),
    "branches.fundus.encoder.bn.num_batches_tracked": (),
    "prototypes.fundus.weight": (2, 3),
    "fusion.0.weight": (2, 6),
    "absent.oct.weight": (3, 1),
}


def _global() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    return {
        k: np.array(5) if k.endswith("num_batches_tracked") else gen.normal(size=s)
        for k, s in SHAPES.items()
    }


def _trained(seed: int, parts: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The global model with the given parts moved (as a site's training moves them)."""
    gen = np.random.default_rng(seed)
    out = {}
    for k, v in _global().items():
        if model_part(k) not in parts:
            out[k] = v.copy()
        elif v.dtype.kind == "i":
            out[k] = v + 3 + seed
        else:
            out[k] = v + gen.normal(size=v.shape)
    return out


ALL = ("oct", "fundus", "fusion", "shared")
OCT_ONLY = ("oct", "shared")


def _reply(node: int, state: dict, site: str, n: int, eyes: tuple | None = None) -> Message:
    """A train reply; `eyes` = (eyes-oct, eyes-fundus, eyes-complete), None for an older site."""
    metrics = {"num-examples": n, "unit-weight": 1.0, "train-loss": 1.0}
    if eyes is not None:
        metrics.update(zip(("eyes-oct", "eyes-fundus", "eyes-complete"), eyes, strict=True))
    arrays = ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return train_reply(node, arrays, site, metrics)


def _strategy(name: str = "fedavg", **fed) -> RemdrStrategy:
    _, cfg = split_run_config({"min-nodes": 3, "strategy": name, "drift-control": "off", **fed})
    s = build_strategy(cfg)
    s.current = {"round": 1}
    s._global = _global()
    s._sampled["train"] = [1, 2, 3]
    base = getattr(s.inner, "strategy", s.inner)
    base.current_arrays = _global()  # what FedAdam's configure_train keeps
    if base is not s.inner:  # and the DP wrapper's
        s.inner.current_arrays = ArrayRecord({k: Array(np.array(v)) for k, v in _global().items()})
    return s


def _aggregate(s: RemdrStrategy, replies: list[Message]) -> dict[str, np.ndarray]:
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None, s.current.get("errors")
    return {k: v.numpy() for k, v in arrays.items()}


def _mean(states: list[dict], weights: list[float], key: str) -> np.ndarray:
    total = sum(w * s[key].astype(np.float64) for s, w in zip(states, weights, strict=True))
    return _as_global(key, total / sum(weights))


def _as_global(key: str, value: np.ndarray) -> np.ndarray:
    """`value` in the global model's dtype, as the coordinator releases it (an integer counter
    rounded half to even)."""
    want = _global()[key].dtype
    return np.rint(value).astype(want) if want.kind == "i" else np.asarray(value, want)


def _constant(by_part: dict[str, float]) -> dict[str, np.ndarray]:
    """The global model with each part in `by_part` set to that constant (integer counters
    stay as they were)."""
    return {
        k: np.full(v.shape, by_part[model_part(k)])
        if model_part(k) in by_part and v.dtype.kind == "f"
        else v
        for k, v in _global().items()
    }


def _keys(part: str) -> list[str]:
    return [k for k in SHAPES if model_part(k) == part]


def test_fedavg_weights_each_part_by_the_eyes_that_trained_it():
    s = _strategy()
    replies = [
        _reply(1, _constant(dict.fromkeys(ALL, 1.0)), "A", 10, (10, 10, 10)),  # complete eyes
        _reply(2, _constant(dict.fromkeys(OCT_ONLY, 2.0)), "B", 20, (20, 0, 0)),  # OCT-only
        # mixed: 15 complete, 5 OCT-only and 10 fundus-only eyes
        _reply(3, _constant(dict.fromkeys(ALL, 4.5)), "C", 30, (20, 25, 15)),
    ]
    merged = _aggregate(s, replies)
    expected = {
        "oct": (10 * 1 + 20 * 2 + 20 * 4.5) / 50,  # 2.8
        "fundus": (10 * 1 + 25 * 4.5) / 35,  # 3.5; plain FedAvg: (10 + 0 + 30 * 4.5) / 60
        "fusion": (10 * 1 + 15 * 4.5) / 25,  # 3.1
        "shared": (10 * 1 + 20 * 2 + 30 * 4.5) / 60,  # by num-examples, as always
    }
    for key, value in merged.items():
        if value.dtype.kind == "i":  # every site left it at the global's value
            assert value == _global()[key], key
            continue
        np.testing.assert_allclose(value, expected[model_part(key)], rtol=1e-12, err_msg=key)
    assert s.current["part-aggregation"] == {
        "oct": ["A", "B", "C"],
        "fundus": ["A", "C"],
        "fusion": ["A", "C"],
    }
    assert s.current["train"]["eyes-fundus"] == 35  # counts add up over the sites


def test_an_oct_only_site_leaves_the_fundus_part_to_the_sites_with_fundus():
    a, b, c = _trained(1, ALL), _trained(2, ALL), _trained(3, OCT_ONLY)
    replies = [
        _reply(1, a, "A", 10, (10, 10, 10)),
        _reply(2, b, "B", 30, (30, 30, 30)),
        _reply(3, c, "C", 50, (50, 0, 0)),
    ]
    merged = _aggregate(_strategy(), replies)
    for key in _keys("fundus") + _keys("fusion"):
        np.testing.assert_allclose(merged[key], _mean([a, b], [10, 30], key), rtol=1e-12)
    for key in _keys("oct") + _keys("shared"):  # every site trained these on all its eyes
        np.testing.assert_allclose(merged[key], _mean([a, b, c], [10, 30, 50], key), rtol=1e-12)


def test_a_part_no_site_trained_stays_exactly_global():
    replies = [_reply(i, _trained(i, OCT_ONLY), f"S{i}", 10 * i, (10 * i, 0, 0)) for i in (1, 2, 3)]
    s = _strategy()
    merged = _aggregate(s, replies)
    for key in _keys("fundus") + _keys("fusion"):
        assert np.array_equal(merged[key], _global()[key]), key
    assert s.current["part-aggregation"]["fundus"] == []


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_aggregates_a_part_over_its_trainers_only(name):
    g = _global()
    a, b, c = _trained(1, ALL), _trained(2, ALL), _trained(3, OCT_ONLY)
    s = _strategy(name)
    merged = _aggregate(
        s,
        [
            _reply(1, a, "A", 10, (10, 10, 10)),
            _reply(2, b, "B", 30, (30, 30, 30)),
            _reply(3, c, "C", 50, (50, 0, 0)),
        ],
    )
    assert merged.keys() == g.keys()
    for key, value in merged.items():
        assert value.shape == g[key].shape and np.isfinite(value).all(), key
    assert s.current["part-aggregation"]["fundus"] == ["A", "B"]
    base = getattr(s.inner, "strategy", s.inner)
    fundus = _keys("fundus")
    own = aggregate_part(base, [{k: x[k] for k in fundus} for x in (a, b)], [10.0, 30.0])
    for key in fundus:
        if name == "fedadam":  # the server step goes towards the trainers' mean, not C's global
            if g[key].dtype.kind == "f":  # (a counter's step of ~eta rounds back to it)
                moved = own[key] - g[key]
                assert (np.sign(merged[key] - g[key]) == np.sign(moved)).all(), key
        else:
            assert np.array_equal(merged[key], _as_global(key, own[key])), key
    if name == "fedmedian":  # the median of A and B, not of A, B and C's untouched global
        key = "branches.fundus.encoder.w"
        assert np.allclose(merged[key], (a[key] + b[key]) / 2)
    if name == "krum":  # one of the trainers' fundus parts
        key = "branches.fundus.encoder.w"
        assert any(np.array_equal(merged[key], x[key]) for x in (a, b))


@pytest.mark.parametrize("name", STRATEGIES)
@pytest.mark.parametrize("eyes", ["older sites", "complete eyes"])
def test_a_complete_federation_is_aggregated_bit_for_bit_as_before(name, eyes):
    """As Flower's strategy alone aggregates it, in the global model's dtypes."""

    def replies() -> list[Message]:
        return [
            _reply(i, _trained(i, ALL), f"S{i}", n, None if eyes == "older sites" else (n,) * 3)
            for i, n in ((1, 10), (2, 30), (3, 50))
        ]

    s = _strategy(name)
    merged = _aggregate(s, replies())
    plain = _strategy(name).inner  # Flower's strategy alone, as before per-part aggregation
    before = {
        k: _as_global(k, v.numpy()) for k, v in plain.aggregate_train(1, replies())[0].items()
    }
    assert merged.keys() == before.keys()
    for key in before:
        assert merged[key].dtype == before[key].dtype and np.array_equal(merged[key], before[key])
    assert "part-aggregation" not in s.current


def test_an_older_site_among_newer_ones_counts_as_complete():
    a, b, c = _trained(1, ALL), _trained(2, ALL), _trained(3, OCT_ONLY)
    replies = [
        _reply(1, a, "A", 10),  # no eyes-* metrics
        _reply(2, b, "B", 30, (30, 30, 30)),
        _reply(3, c, "C", 50, (50, 0, 0)),
    ]
    merged = _aggregate(_strategy(), replies)
    key = "branches.fundus.encoder.w"
    np.testing.assert_allclose(merged[key], _mean([a, b], [10, 30], key), rtol=1e-12)


def test_per_part_aggregation_leaves_fedadam_resumable():
    """Per-part aggregation keeps no state of its own: FedAdam's moments (per key) are all a
    resumed coordinator needs to continue bit for bit."""

    def replies() -> list[Message]:
        return [
            _reply(1, _trained(1, ALL), "A", 10, (10, 10, 10)),
            _reply(2, _trained(2, OCT_ONLY), "B", 20, (20, 0, 0)),
            _reply(3, _trained(3, ALL), "C", 30, (20, 25, 15)),
        ]

    first = _strategy("fedadam")
    _aggregate(first, replies())
    arrays, scalars = first.state_dict()
    assert {k.split("/", 1)[1] for k in arrays if k.startswith("m_t/")} == set(SHAPES)
    resumed = _strategy("fedadam")
    resumed.load_state_dict(arrays, scalars)
    a, b = _aggregate(first, replies()), _aggregate(resumed, replies())
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_site_level_dp_refuses_per_part_aggregation_in_the_round_log():
    s = _strategy(**{"site-dp": "fixed", "group-norm": "true"})
    replies = [
        _reply(1, _trained(1, ALL), "A", 10, (10, 10, 10)),
        _reply(2, _trained(2, OCT_ONLY), "B", 20, (20, 0, 0)),
        _reply(3, _trained(3, ALL), "C", 30, (30, 30, 30)),
    ]
    _aggregate(s, replies)
    refused = s.current["part-aggregation"]["refused"]
    assert "site-level DP" in refused and "fundus by 2 of 3" in refused
    assert s.current["aggregated"] == ["A", "B", "C"]  # aggregated as one plain mean


def test_screening_rejects_a_site_that_changed_a_part_it_did_not_train():
    cheat = _trained(2, ALL)  # claims OCT-only eyes, yet its fundus part and fusion head moved
    fusion_only = _trained(3, ("oct", "fusion", "shared"))  # fusion moved, no complete eyes
    s = _strategy()
    replies = [
        _reply(1, _trained(1, ALL), "A", 10, (10, 10, 10)),
        _reply(2, cheat, "B", 20, (20, 0, 0)),
        _reply(3, fusion_only, "C", 20, (20, 20, 0)),
    ]
    _aggregate(s, replies)
    assert s.current["rejected"] == ["B", "C"] and s.current["aggregated"] == ["A"]
    reasons = {e["site"]: e["reason"] for e in s.current["errors"]}
    assert "changed the fundus part" in reasons["B"] and "trained no fundus eyes" in reasons["B"]
    assert "changed the fusion part" in reasons["C"] and "trained no complete eyes" in reasons["C"]


@pytest.mark.parametrize(
    "eyes, problem",
    [
        ((-1, 10, 9), "negative"),
        ((10, 2.5, 2), "whole number"),
        ((11, 10, 10), "exceeds num-examples"),
        ((10, float("nan"), 10), "whole number"),
        (None, None),
        ((10, 0, 0), None),
    ],
)
def test_impossible_eye_counts_are_rejected(eyes, problem):
    metrics = {"num-examples": 10}
    if eyes is not None:
        metrics.update(zip(("eyes-oct", "eyes-fundus", "eyes-complete"), eyes, strict=True))
    reason = counts_problem(metrics)
    assert reason is None if problem is None else problem in reason
    # and through the strategy: the site is named and refused, the others aggregated
    if problem is not None:
        s = _strategy()
        state = _trained(2, ALL)
        _aggregate(s, [_reply(1, _trained(1, ALL), "A", 10), _reply(2, state, "B", 10, eyes)])
        assert s.current["rejected"] == ["B"]


def test_eye_counts_come_all_three_with_num_examples():
    assert "incomplete" in counts_problem({"num-examples": 10, "eyes-oct": 3})
    assert "num-examples" in counts_problem({"eyes-oct": 3})


def test_an_unchanged_untrained_part_passes_screening_whatever_its_dtype():
    g = _global()
    update = {**_trained(1, OCT_ONLY), "branches.fundus.encoder.bn.num_batches_tracked": 5.0}
    counts = trained_counts(
        {"num-examples": 8, "eyes-oct": 8, "eyes-fundus": 0, "eyes-complete": 0}
    )
    assert untrained_part_problem(update, g, counts) is None
    update["prototypes.fundus.weight"] = g["prototypes.fundus.weight"] * (1 - 1e-4)  # decayed
    assert "changed the fundus part" in untrained_part_problem(update, g, counts)


# -- the site's side -------------------------------------------------------------------------


def _oct_only_site(tiny_data, cfg):
    site = load_site(tiny_data, cfg, seed=cfg.train.seed)
    only = lambda ds: EyeDataset(  # noqa: E731
        [dataclasses.replace(r, modalities=("oct",)) for r in ds.records], cfg.data
    )
    return dataclasses.replace(site, train=only(site.train), val=only(site.val))


@pytest.mark.parametrize(("method", "view"), [("remdr", "bscans"), ("remdr_dp", "rnflt")])
def test_an_oct_only_site_sends_its_fundus_and_fusion_parts_back_as_received(
    tiny_data, one_thread, tmp_path, method, view
):
    """The real train path at a site whose eyes all lack fundus, private (DP-SGD over the
    parts it trains) or not: the parts it has no eyes for come back exactly as received."""
    from test_client_app import RUN_CONFIG, _initial

    run_config = {**RUN_CONFIG, "method": method, "oct-view": view}
    run_config["dp-ledger"] = str(tmp_path / "ledger.jsonl")
    cfg, fed = split_run_config(run_config)
    site = _oct_only_site(tiny_data, cfg)
    initial = _initial(run_config)
    received = {k: v.clone() for k, v in initial.items()}
    result = train_round(cfg, fed, initial, site, server_round=1)
    m = result.metrics
    assert (m["eyes-oct"], m["eyes-fundus"], m["eyes-complete"]) == (len(site.train), 0, 0)
    assert (m.get("dp-epsilon", 0) > 0) == method.endswith("_dp")
    parts = {k: model_part(k) for k in received}
    untrained = [k for k, p in parts.items() if p in ("fundus", "fusion")]
    assert untrained and all(torch.equal(result.state[k], received[k]) for k in untrained)
    oct_part = [k for k, p in parts.items() if p == "oct"]
    assert any(not torch.equal(result.state[k], received[k]) for k in oct_part)
    # the coordinator's screening accepts it
    update = {k: v.numpy() for k, v in result.state.items()}
    reference = {k: v.numpy() for k, v in received.items()}
    assert counts_problem(m) is None
    assert untrained_part_problem(update, reference, trained_counts(m)) is None


def test_an_oct_only_site_trains_its_encoder_against_the_received_fusion_head(
    tiny_data, one_thread
):
    """Every forward pass of the round, training steps included, sees the fusion head the
    coordinator sent: the site's OCT encoder learns against the federation's head, not against
    a local copy that drifts over the round and is then thrown away."""
    from test_client_app import RUN_CONFIG, _initial

    run_config = {**RUN_CONFIG, "method": "remdr", "oct-view": "bscans"}
    cfg, fed = split_run_config(run_config)
    site = _oct_only_site(tiny_data, cfg)
    initial = _initial(run_config)
    received = {
        k[len("fusion.") :]: v.clone() for k, v in initial.items() if k.startswith("fusion.")
    }
    drifted, passes = [], []

    def check_fusion(module, _inputs):
        fusion = getattr(module, "fusion", None)
        if not isinstance(fusion, torch.nn.Module) or not module.training:
            return
        passes.append(1)
        now = fusion.state_dict()
        drifted.extend(k for k, v in received.items() if not torch.equal(now[k].cpu(), v))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(check_fusion)
    try:
        result = train_round(cfg, fed, initial, site, server_round=1)
    finally:
        hook.remove()
    assert len(passes) >= result.metrics["train-steps"] >= 2
    assert not drifted, f"the fusion head moved during local training: {sorted(set(drifted))}"


def test_a_site_whose_eyes_now_reach_the_fusion_head_starts_new_moments(tiny_data, one_thread):
    """An OCT-only site that gains complete eyes between rounds trains more parts than its saved
    AdamW moments cover: the round trains (new moments, as a fresh site would), not an error."""
    from test_client_app import RUN_CONFIG, _initial

    run_config = {**RUN_CONFIG, "method": "remdr", "oct-view": "bscans", "optimizer": "adamw"}
    cfg, fed = split_run_config(run_config)
    assert fed.keep_site_optimizer
    complete = load_site(tiny_data, cfg, seed=cfg.train.seed)
    initial = _initial(run_config)
    first = train_round(cfg, fed, initial, _oct_only_site(tiny_data, cfg), server_round=1)
    assert first.carried.optimizer
    second = train_round(cfg, fed, initial, complete, server_round=2, carried=first.carried)
    fresh_moments = dataclasses.replace(first.carried, optimizer=None)
    same = train_round(cfg, fed, initial, complete, server_round=2, carried=fresh_moments)
    assert all(torch.equal(second.state[k], same.state[k]) for k in same.state)
    # and a site whose trainable parts did not change resumes its moments
    third = train_round(cfg, fed, initial, complete, server_round=3, carried=second.carried)
    fresh = train_round(
        cfg, fed, initial, complete, server_round=3,
        carried=dataclasses.replace(second.carried, optimizer=None),
    )  # fmt: skip
    assert any(not torch.equal(third.state[k], fresh.state[k]) for k in fresh.state)


def test_restore_untrained_puts_back_exactly_the_received_values_and_dtypes(one_thread):
    from test_client_app import RUN_CONFIG

    from remdr.methods import build_model

    cfg, _ = split_run_config({**RUN_CONFIG, "method": "remdr"})
    torch.manual_seed(0)
    model = build_model(cfg)
    # FedAvg hands integer counters back as floats, maybe fractional
    received = {
        k: v.double() + 0.5 if v.dtype == torch.long else v.clone()
        for k, v in model.state_dict().items()
    }
    with torch.no_grad():  # as local training (or weight decay) would
        for p in model.parameters():
            p.add_(0.5)
    counts = {"eyes-oct": 4, "eyes-fundus": 0, "eyes-complete": 0}
    restored = restore_untrained(model, received, counts)
    assert {model_part(k) for k in restored} == {"fundus", "fusion"}
    for key, value in restored.items():
        assert value.dtype == received[key].dtype and torch.equal(value, received[key])
    now = model.state_dict()  # the model validates what is sent
    assert all(torch.equal(now[k], received[k]) for k in restored if now[k].is_floating_point())
    oct_key = next(k for k in now if model_part(k) == "oct" and now[k].is_floating_point())
    assert not torch.equal(now[oct_key], received[oct_key])
    complete = {"eyes-oct": 4, "eyes-fundus": 4, "eyes-complete": 4}
    assert restore_untrained(model, received, complete) == {}


def test_eye_counts_count_training_eyes_by_image():
    from remdr.data.records import EyeRecord

    kinds = [("oct", "fundus"), ("oct",), ("fundus",), ("oct",), ("oct", "fundus")]
    records = [EyeRecord(f"e{i}", "p", -3.0, "npz", "x", modalities=m) for i, m in enumerate(kinds)]
    assert eye_counts(records) == {"eyes-oct": 4, "eyes-fundus": 3, "eyes-complete": 2}


def test_a_site_with_its_own_test_split_aggregates_beside_one_without():
    """Only a site that ships a test/ split sends test-* (and received-test-*) metrics; Flower
    refuses replies whose metric keys differ, so those keys are kept per site, then dropped."""
    s = _strategy()
    replies = [_reply(i, _trained(i, ("oct", "fundus", "fusion")), f"s{i}", 10) for i in (1, 2, 3)]
    extra = {"test-mse": 4.0, "num-test": 5, "received-test-mse": 5.0, "received-num-test": 5}
    next(iter(replies[0].content.metric_records.values())).update(extra)
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and "test-mse" not in metrics
    assert s.current["sites"]["s1"]["test-mse"] == 4.0  # still in the round record, per site
    assert s.received["s1"]["test-mse"] == 5.0


@pytest.mark.parametrize("name", ["fedavg", "fedadam", "fedtrimmedavg"])
def test_the_aggregate_does_not_depend_on_the_order_the_replies_arrived_in(name):
    """Replies arrive in whatever order the sites finish; summed in that order, the global model
    differed in its last bits between two runs of one seed, and training amplified it."""

    def replies() -> list[Message]:
        return [
            _reply(1, _trained(1, ALL), "a", 40, (40, 40, 40)),
            _reply(2, _trained(2, ALL), "b", 7, (7, 7, 7)),
            _reply(3, _trained(3, OCT_ONLY), "c", 13, (13, 0, 0)),
        ]

    forward = _aggregate(_strategy(name), replies())
    for order in ([2, 0, 1], [1, 2, 0]):
        shuffled = _aggregate(_strategy(name), [replies()[i] for i in order])
        for key, value in forward.items():
            assert value.tobytes() == shuffled[key].tobytes(), key
