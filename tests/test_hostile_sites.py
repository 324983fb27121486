"""A hostile or broken site cannot break the global model, the report or the run: every count
that weighs a site is bounded, every array keeps the global model's dtype, a malformed reply is
refused and named, and FedAdam leaves untrained parts be. (A site's name belongs to one node:
test_site_names.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import flower_run_identity
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from remdr.server.strategy import build_strategy
from replies import Federation, Nodes, arrays, evaluate_reply, reply, train_reply

from remdr.federation.run_config import split_run_config
from remdr.federation.screening import update_problem
from remdr.model import model_part

# one array per part of the model, float32 as torch makes them, plus an integer counter
SHAPES = {
    "branches.oct.encoder.w": (4, 3),
    "branches.fundus.encoder.w": (4, 3),
    "fusion.0.weight": (2, 6),
    "absent.oct.weight": (3,),
}
COUNTER = "branches.oct.encoder.bn.num_batches_tracked"


def model(seed: int = 0) -> dict[str, np.ndarray]:
    gen = np.random.default_rng(seed)
    out = {k: gen.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    out[COUNTER] = np.array(5, dtype=np.int64)
    return out


def moved(state: dict, by: float = 0.01, parts=("oct", "fundus", "fusion", "shared")) -> dict:
    """`state` with the floating-point arrays of `parts` moved by `by` (as training moves them)."""
    return {
        k: (v + np.float32(by)).astype(v.dtype)
        if v.dtype.kind == "f" and model_part(k) in parts
        else v.copy()
        for k, v in state.items()
    }


def metrics(n: float = 10, **extra) -> dict:
    return {"num-examples": n, "unit-weight": 1.0, "train-loss": 1.0, **extra}


def site_reply(node: int, state: dict, site: str, **metric_values) -> object:
    return train_reply(node, arrays(state), site, metrics(**metric_values))


@pytest.fixture(scope="module", autouse=True)
def _in_a_run():
    with flower_run_identity():  # module scope: hypothesis runs many examples per test
        yield


def federation(nodes=(1, 2, 3), names=None, **run_config) -> Federation:
    return Federation(model(), Nodes(list(nodes), names), run_config)


def finite(state: dict) -> bool:
    return all(np.isfinite(v).all() for v in state.values())


def rejected(record: dict) -> dict[str, str]:
    """Site -> reason of every reply the round refused."""
    return {e["site"]: e["reason"] for e in record.get("errors", [])}


# -- 7: the counts that weigh a site are bounded -------------------------------------------------


@pytest.mark.parametrize(
    "n, reason",
    [
        (float("inf"), "not finite"),
        (float("nan"), "not finite"),
        (-3, "not positive"),
        (0, "not positive"),
        (2.5, "whole"),
        ([10, 10], "not a number"),
        (1e300, "max-site-examples"),
        (10**6, "max-site-examples"),
    ],
)
def test_an_impossible_example_count_is_refused_and_the_model_stays_finite(n, reason):
    fed = federation()
    record = fed.train(
        lambda g: [
            site_reply(1, moved(g), "A"),
            site_reply(2, moved(g), "B", n=20),
            site_reply(3, moved(g, 5.0), "C", n=n),
        ]
    )
    assert record["rejected"] == ["C"] and record["aggregated"] == ["A", "B"]
    assert reason in rejected(record)["C"]
    assert finite(fed.model)
    key = "fusion.0.weight"  # A and B moved it by 0.01; C's 5.0 never counted
    np.testing.assert_allclose(fed.model[key], moved(model())[key], rtol=1e-6)


def test_all_zero_counts_keep_the_global_model():
    fed = federation()
    # sent back unchanged, as a site with no eyes would: nothing else refuses them
    record = fed.train(lambda g: [site_reply(i, g, s, n=0) for i, s in ((1, "A"), (2, "B"))])
    assert sorted(record["rejected"]) == ["A", "B"]
    assert all(np.array_equal(fed.model[k], model()[k]) for k in fed.model)


def test_a_sites_count_may_grow_at_most_twofold_over_its_first_round():
    fed = federation(nodes=(1, 2))
    fed.train(lambda g: [site_reply(1, moved(g), "A", n=10), site_reply(2, moved(g), "B", n=10)])
    record = fed.train(
        lambda g: [site_reply(1, moved(g), "A", n=20), site_reply(2, moved(g), "B", n=21)]
    )
    assert record["rejected"] == ["B"] and "grew" in rejected(record)["B"]
    assert record["aggregated"] == ["A"]


def test_max_site_examples_is_the_coordinators_cap():
    fed = federation(nodes=(1, 2), **{"max-site-examples": 50})
    record = fed.train(
        lambda g: [site_reply(1, moved(g), "A", n=50), site_reply(2, moved(g), "B", n=51)]
    )
    assert record["rejected"] == ["B"] and "max-site-examples 50" in rejected(record)["B"]


@pytest.mark.parametrize("site_dp", ["off", "fixed"])
def test_unit_weight_is_one_whatever_a_site_says(site_dp):
    """Site-level DP weighs every site by `unit-weight`: colluding sites that raised theirs
    would shrink an honest site's share of the mean, and so the noise that hides it."""
    extra = {"site-dp": site_dp, "group-norm": True, "site-dp-noise": 1e-6, "site-dp-clip": 10.0}
    fed = federation(**extra)

    def replies(g):
        out = [site_reply(i, moved(g), s) for i, s in ((1, "A"), (2, "B"))]
        bad = site_reply(3, moved(g), "C")
        next(iter(bad.content.metric_records.values()))["unit-weight"] = 1e6
        return [*out, bad]

    record = fed.train(replies)
    assert record["rejected"] == ["C"] and "unit-weight" in rejected(record)["C"]


def test_num_val_cannot_choose_the_best_model():
    """The sites' validation of the model they received (weighted by `received-num-val`) is
    what selects best.safetensors: a site claiming a huge validation set is refused."""
    fed = federation(nodes=(1, 2))
    honest = {"received-val-mse": 9.0, "received-num-val": 5}
    liar = {"received-val-mse": 0.0, "received-num-val": 1e300}
    record = fed.train(
        lambda g: [
            site_reply(1, moved(g), "A", **honest),
            site_reply(2, moved(g), "B", **liar),
        ]
    )
    assert record["rejected"] == ["B"] and "received-num-val" in rejected(record)["B"]
    aggregate, per_site = fed.strategy.take_received()
    assert aggregate["val-mse"] == 9.0 and list(per_site) == ["A"]


def test_num_val_of_an_evaluate_reply_is_bounded_by_the_sites_first():
    fed = federation(nodes=(1, 2))
    fed.train(
        lambda g: [
            site_reply(1, moved(g), "A", **{"num-val": 5}),
            site_reply(2, moved(g), "B", **{"num-val": 5}),
        ]
    )
    s = fed.strategy
    s._sampled["evaluate"] = [1, 2]
    s.current = {"round": 2}
    replies = [
        evaluate_reply(1, "A", {"num-examples": 5, "num-val": 5, "val-mse": 9.0}),
        evaluate_reply(2, "B", {"num-examples": 1000, "num-val": 1000, "val-mse": 0.0}),
    ]
    aggregate = s.aggregate_evaluate(2, replies)
    assert s.current["rejected"] == ["B"] and "grew" in rejected(s.current)["B"]
    assert aggregate["val-mse"] == 9.0


# -- 8: every array keeps the global model's dtype -----------------------------------------------


def test_an_update_of_another_dtype_is_refused():
    g = model()
    huge = {**g, "fusion.0.weight": np.full(SHAPES["fusion.0.weight"], 10**15, dtype=np.int64)}
    assert "dtype" in update_problem(huge, g, max_norm=1e4)
    wider = {**g, "fusion.0.weight": g["fusion.0.weight"].astype(np.float64)}
    assert "dtype" in update_problem(wider, g, max_norm=1e4)
    floated = {**g, COUNTER: np.array(5.0)}
    assert "dtype" in update_problem(floated, g, max_norm=1e4)


@pytest.mark.parametrize("extra", [{}, {"site-dp": "fixed", "group-norm": True}])
def test_the_global_model_keeps_its_dtypes(extra):
    """FedAvg's mean makes an integer counter float64 and Flower's DP noise makes float32
    arrays float64: the coordinator casts the aggregate back, so an honest site's next update
    (in the model's own dtypes) matches it."""
    fed = federation(nodes=(1, 2), **extra)

    def replies(g):
        a, b = moved(g), moved(g, 0.02)
        a[COUNTER], b[COUNTER] = np.array(8, np.int64), np.array(11, np.int64)
        return [site_reply(1, a, "A"), site_reply(2, b, "B")]

    for _ in range(2):
        record = fed.train(replies)
        assert record["aggregated"] == ["A", "B"], record.get("errors")
    assert {k: v.dtype for k, v in fed.model.items()} == {k: v.dtype for k, v in model().items()}
    if not extra:
        assert fed.model[COUNTER] == 10  # the mean 9.5, rounded half to even


# -- 9: a malformed reply is refused and named, never a crash ------------------------------------


def _content(g: dict, **records) -> RecordDict:
    base = {
        "arrays": arrays(moved(g)),
        "metrics": MetricRecord(metrics()),
        "site": ConfigRecord({"site-id": "C"}),
    }
    return RecordDict({k: v for k, v in {**base, **records}.items() if v is not None})


MALFORMED = {
    "a second ArrayRecord": lambda g: _content(g, more=arrays(moved(g))),
    "a control variate nobody asked for": lambda g: _content(g, control=arrays(moved(g))),
    "no ArrayRecord": lambda g: _content(g, arrays=None),
    "no MetricRecord": lambda g: _content(g, metrics=None),
    "two MetricRecords": lambda g: _content(g, more=MetricRecord(metrics())),
    "no site record": lambda g: _content(g, site=None),
    "no site-id": lambda g: _content(g, site=ConfigRecord({"name": "C"})),
    "a site-id that is no name": lambda g: _content(g, site=ConfigRecord({"site-id": 7})),
    "a site-id with a path in it": lambda g: _content(g, site=ConfigRecord({"site-id": "../A"})),
    "no num-examples": lambda g: _content(g, metrics=MetricRecord({"unit-weight": 1.0})),
    "a negative error metric": lambda g: _content(
        g, metrics=MetricRecord(metrics(**{"val-mse": -1e300}))
    ),
    "an absurd metric": lambda g: _content(
        g, metrics=MetricRecord(metrics(**{"train-loss": 1e300}))
    ),
    "nothing at all": lambda g: RecordDict(),
}


@pytest.mark.parametrize("what", MALFORMED)
def test_a_malformed_train_reply_is_refused_and_named(what):
    fed = federation()
    record = fed.train(
        lambda g: [
            site_reply(1, moved(g), "A"),
            site_reply(2, moved(g), "B"),
            reply(3, MALFORMED[what](g)),
        ]
    )
    assert record["aggregated"] == ["A", "B"]
    named = record["rejected"]
    assert len(named) == 1 and named[0] in ("C", "node-3"), record
    assert finite(fed.model)


def test_sites_that_send_different_metrics_aggregate_each_over_its_senders():
    """A site may share fewer metrics (its metrics policy) or more (a newer version): Flower
    sees the metrics every site sent, the round's aggregate has each metric over the sites that
    sent it, and each site's own stay in the record."""
    fed = federation()
    record = fed.train(
        lambda g: [
            site_reply(1, moved(g), "A", **{"val-mse": 4.0, "val-mae-severe": 3.0}),
            site_reply(2, moved(g), "B", **{"val-mse": 2.0}),
            site_reply(3, moved(g), "C", n=20, **{"new-metric": 1.0}),
        ]
    )
    assert record["aggregated"] == ["A", "B", "C"] and "rejected" not in record
    assert record["train"]["val-mse"] == 3.0 and record["train"]["val-mae-severe"] == 3.0
    assert record["train"]["num-examples"] == 40
    assert record["sites"]["C"]["new-metric"] == 1.0


def test_a_malformed_evaluate_reply_is_refused_and_named():
    s = build_strategy(split_run_config({"min-nodes": 3, "drift-control": "off"})[1])
    s.current, s._sampled["evaluate"] = {"round": 1}, [1, 2, 3]
    replies = [
        evaluate_reply(1, "A", {"num-examples": 5, "val-mse": 2.0}),
        evaluate_reply(2, "B", {"num-examples": 5, "val-mse": 4.0, "val-extra": 1.0}),
        reply(3, RecordDict({"site": ConfigRecord({"site-id": "C"})}), "evaluate"),
    ]
    aggregate = s.aggregate_evaluate(1, replies)
    assert aggregate["val-mse"] == 3.0
    assert s.current["rejected"] == ["node-3"] and "MetricRecord" in rejected(s.current)["node-3"]


# -- 11: FedAdam leaves a part no site trained where it was --------------------------------------


def test_fedadam_leaves_a_part_no_site_trained_where_it_was():
    fed = federation(nodes=(1, 2), strategy="fedadam")
    eyes = {"eyes-oct": 10, "eyes-fundus": 10, "eyes-complete": 10}
    fed.train(lambda g: [site_reply(i, moved(g, 0.1), s, **eyes) for i, s in ((1, "A"), (2, "B"))])
    before = dict(fed.model)
    base = fed.strategy.inner
    moments = {k: (base.m_t[k].copy(), base.v_t[k].copy()) for k in base.m_t}
    oct_only = {"eyes-oct": 10, "eyes-fundus": 0, "eyes-complete": 0}
    fed.train(
        lambda g: [
            site_reply(i, moved(g, 0.1, ("oct", "shared")), s, **oct_only)
            for i, s in ((1, "A"), (2, "B"))
        ]
    )
    for key in ("branches.fundus.encoder.w", "fusion.0.weight"):
        assert np.array_equal(fed.model[key], before[key]), key
        assert np.array_equal(base.m_t[key], moments[key][0])
        assert np.array_equal(base.v_t[key], moments[key][1])
    assert not np.array_equal(fed.model["branches.oct.encoder.w"], before["branches.oct.encoder.w"])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_release_that_is_not_finite_is_never_made():
    """The last line: Flower draws DP noise in float64 and casts it to the weights' dtype, so
    noise past float32's range is infinite there."""
    fed = federation(
        nodes=(1, 2), **{"site-dp": "fixed", "group-norm": True, "site-dp-noise": 1e300}
    )
    record = fed.train(lambda g: [site_reply(i, moved(g), s) for i, s in ((1, "A"), (2, "B"))])
    assert "non-finite" in record["refused"] and "site_dp_release" not in record
    assert all(np.array_equal(fed.model[k], model()[k]) for k in fed.model)


def test_an_int_array_in_a_reply_cannot_smuggle_values_past_screening():
    fed = federation(nodes=(1, 2))

    def replies(g):
        bad = moved(g)
        bad["fusion.0.weight"] = np.full(SHAPES["fusion.0.weight"], 10**15, dtype=np.int64)
        return [site_reply(1, moved(g), "A"), train_reply(2, arrays(bad), "B", metrics())]

    record = fed.train(replies)
    assert record["rejected"] == ["B"] and "dtype" in rejected(record)["B"]
    assert np.abs(fed.model["fusion.0.weight"]).max() < 10


def test_a_site_whose_update_is_refused_does_not_vote_on_the_best_model():
    fed = federation(nodes=(1, 2))
    scores = {"received-val-mse": 9.0, "received-num-val": 5}

    def replies(g):
        bad = moved(g)
        bad["fusion.0.weight"][0, 0] = np.nan
        return [
            site_reply(1, moved(g), "A", **scores),
            site_reply(2, bad, "B", **{**scores, "received-val-mse": 0.0}),
        ]

    record = fed.train(replies)
    assert record["rejected"] == ["B"] and "non-finite" in rejected(record)["B"]
    aggregate, per_site = fed.strategy.take_received()
    assert aggregate["val-mse"] == 9.0 and list(per_site) == ["A"]


def test_a_resumed_global_model_takes_the_models_dtypes():
    """Weights saved before the coordinator kept the model's dtypes (FedAvg's float64
    counters) are cast back on resume, so the sites' updates match them."""
    import torch
    from remdr.server.app import in_model_dtypes

    saved = {"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(9.5, dtype=torch.float64)}
    model = {"w": torch.zeros(2), "bn.num_batches_tracked": torch.tensor(0)}
    resumed = in_model_dtypes(saved, model)
    assert resumed["bn.num_batches_tracked"].dtype == torch.int64
    assert resumed["bn.num_batches_tracked"] == 10 and torch.equal(resumed["w"], saved["w"])
