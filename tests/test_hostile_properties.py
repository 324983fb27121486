"""Hostile-site properties of the coordinator: whatever one site sends (counts, dtypes, shapes,
extra or missing records, NaN/Inf, huge values, another site's name), the coordinator does not
crash, the global model stays finite in the model's own shapes and dtypes, and the site never
gets more than its bounded share of the mean.

Each example runs two rounds of the real strategy (no mocks): two honest sites send the global
model back unchanged, the hostile one a generated reply; with FedAvg or FedProx the hostile
site's share of the mean is then the distance the global model moved, in units of its step.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import flower_run_identity
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from remdr.server.drift_control import CONTROL
from remdr.server.reply_screening import GROWTH
from replies import Federation, Nodes, arrays, evaluate_reply, reply, train_reply

SHAPES = {"branches.oct.encoder.w": (4, 3), "fusion.0.weight": (2, 6), "absent.oct.weight": (3,)}
COUNTER = "branches.oct.encoder.bn.num_batches_tracked"
STEP_KEY = "fusion.0.weight"  # the array the hostile site moves by one
HONEST = {1: ("A", 20), 2: ("B", 30)}  # node -> (site, training eyes)
HOSTILE = 9
CAP = 1000  # max-site-examples
MAX_NORM = 1e4  # max-update-norm (the default)
FAST = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def model() -> dict[str, np.ndarray]:
    gen = np.random.default_rng(0)
    out = {k: gen.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    out[COUNTER] = np.array(5, dtype=np.int64)
    return out


@pytest.fixture(scope="module", autouse=True)
def _in_a_run():
    with flower_run_identity():  # module scope: hypothesis runs many examples per test
        yield


# -- what a hostile site may send ------------------------------------------------------------------

COUNTS = st.one_of(
    st.integers(min_value=1, max_value=3 * CAP),
    st.integers(min_value=-5, max_value=3 * CAP),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, 2.5, 1e300, -0.0, [5, 5], [1.0, 2.0], None]),
)
METRIC_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=3),
)
# what an honest reply sends, and what a hostile one may send instead, field by field
VALID = {
    "unit": 1.0,
    "dtype": "float32",
    "shape_ok": True,
    "values": "step",
    "mutation": "none",
    "name": "H",
}
WRONG = {
    "unit": st.sampled_from([0.5, 1e6, 0, float("nan"), None]),
    "dtype": st.sampled_from(["float64", "float16", "int64", "int32"]),
    "shape_ok": st.just(False),
    "values": st.sampled_from(["nan", "inf", "huge"]),
    "mutation": st.sampled_from(
        [
            "second ArrayRecord",
            "control record",
            "no ArrayRecord",
            "no MetricRecord",
            "two MetricRecords",
            "no site record",
            "empty",
        ]
    ),
    "name": st.sampled_from(["A", "../H", 7, b"H", ""]),
}


@st.composite
def recipes(draw) -> dict:
    """A hostile reply's recipe: its counts in two rounds, up to two fields sent wrong, and
    whatever other metrics it likes."""
    recipe = dict(VALID)
    for field in draw(st.sets(st.sampled_from(sorted(WRONG)), max_size=2)):
        recipe[field] = draw(WRONG[field])
    recipe["counts"] = (draw(COUNTS), draw(COUNTS))  # num-examples in rounds 1 and 2
    recipe["metrics"] = draw(
        st.dictionaries(
            st.sampled_from(["val-mse", "train-loss", "num-val", "received-num-val", "x y", "zz"]),
            METRIC_VALUES,
            max_size=2,
        )
    )
    return recipe


def hostile_array(recipe: dict, g: dict[str, np.ndarray]) -> np.ndarray:
    """The hostile site's STEP_KEY: the global's moved by one, or NaN/Inf/huge (always huge as
    integers), in its dtype and shape."""
    dtype = np.dtype(recipe["dtype"])
    base = g[STEP_KEY].astype(np.float64) + 1.0
    if recipe["values"] == "nan":
        base[0, 0] = np.nan
    elif recipe["values"] == "inf":
        base[0, 0] = np.inf
    elif recipe["values"] == "huge" or dtype.kind == "i":  # integers smuggle huge values
        base[:] = 1e15 if dtype.kind == "i" else 1e30
    if dtype.kind == "i":
        base = np.nan_to_num(base, nan=0.0, posinf=1e15)
    with np.errstate(over="ignore", invalid="ignore"):
        arr = base.astype(dtype)
    return arr if recipe["shape_ok"] else arr.reshape(-1)


def hostile_reply(recipe: dict, g: dict[str, np.ndarray], round_index: int):
    state = {**g, STEP_KEY: hostile_array(recipe, g)}
    metrics = dict(recipe["metrics"])
    count = recipe["counts"][round_index]
    if count is not None:
        metrics["num-examples"] = count
    if recipe["unit"] is not None:
        metrics["unit-weight"] = recipe["unit"]
    records = {
        "arrays": arrays(state),
        "metrics": MetricRecord(metrics),
        "site": ConfigRecord({"site-id": recipe["name"]}),
    }
    mutation = recipe["mutation"]
    if mutation == "second ArrayRecord":
        records["more"] = arrays(state)
    elif mutation == "control record":
        records[CONTROL] = arrays(state)
    elif mutation == "no ArrayRecord":
        del records["arrays"]
    elif mutation == "no MetricRecord":
        del records["metrics"]
    elif mutation == "two MetricRecords":
        records["more"] = MetricRecord({"num-examples": 10})
    elif mutation == "no site record":
        del records["site"]
    elif mutation == "empty":
        records = {}
    return reply(HOSTILE, RecordDict(records))


def honest_replies(g: dict[str, np.ndarray]):
    return [
        train_reply(node, arrays(g), site, {"num-examples": n, "unit-weight": 1.0})
        for node, (site, n) in HONEST.items()
    ]


# -- the properties ---------------------------------------------------------------------------------


def bound(first: float | None) -> float:
    """The most eyes the hostile site may claim: the cap, and after its first accepted round
    GROWTH times what it claimed then."""
    return CAP if first is None else min(CAP, GROWTH * max(first, 1.0))


def attack(**fields) -> dict:
    """A recipe from the issue's list of attacks: valid but for `fields`."""
    return {**VALID, "counts": (10, 10), "metrics": {}, **fields}


@FAST
@example(attack(dtype="int64"), "fedavg")  # an integer update of ~1e15
@example(attack(counts=(float("inf"), 10)), "fedavg")  # the mean becomes NaN
@example(attack(counts=(1e300, 1e300)), "fedavg")  # all the weight
@example(attack(counts=(10, 1000)), "fedprox")  # 100x more eyes in round 2
@example(attack(unit=1e6), "fedavg")  # shrinks the others' share under site-level DP
@example(attack(mutation="second ArrayRecord"), "fedavg")  # InconsistentMessageReplies
@example(attack(mutation="no MetricRecord"), "fedadam")  # StopIteration
@example(attack(mutation="no site record"), "krum")  # KeyError
@example(attack(name="A"), "fedavg")  # another site's name
@given(
    recipe=recipes(),
    strategy=st.sampled_from(
        ["fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum"]
    ),
)
def test_a_hostile_site_cannot_crash_the_coordinator_or_take_more_than_its_share(recipe, strategy):
    nodes = Nodes([*HONEST, HOSTILE])
    fed = Federation(model(), nodes, {"strategy": strategy, "max-site-examples": CAP})
    total_honest = sum(n for _, n in HONEST.values())
    first = None
    for r in range(2):
        before = dict(fed.model)
        record = fed.train(lambda g, r=r: [*honest_replies(g), hostile_reply(recipe, g, r)])
        # the global model stays finite, in the model's keys, shapes and dtypes
        assert fed.model.keys() == before.keys()
        for key, value in fed.model.items():
            assert value.shape == before[key].shape and value.dtype == before[key].dtype, key
            assert np.isfinite(value).all(), key
        # the honest sites are always aggregated under their own names
        assert {"A", "B"} <= set(record.get("aggregated", [])), record
        event(
            f"round {r + 1}: hostile site "
            + ("aggregated" if "H" in record["aggregated"] else "refused")
        )
        if "H" not in record["aggregated"]:
            continue
        claimed = float(recipe["counts"][r])
        assert claimed <= bound(first)
        # the honest sites did not move: the global model moved by the hostile site's update
        # times its share, and that update is within max-update-norm of the global model
        moved = math.sqrt(
            sum(float(np.sum((fed.model[k] - before[k]).astype(np.float64) ** 2)) for k in before)
        )
        if strategy in ("fedavg", "fedprox"):
            most = bound(first) / (bound(first) + total_honest)
            share = float(np.mean(fed.model[STEP_KEY] - before[STEP_KEY]))
            assert share <= most + 1e-4, (share, most, record)
            assert moved <= most * MAX_NORM * (1 + 1e-6), (moved, record)
            event("share checked")
        elif strategy != "fedadam":  # a robust rule's aggregate lies among the updates
            assert moved <= MAX_NORM * (1 + 1e-6), (moved, record)
        first = claimed if first is None else first


@FAST
@example(count=20, metrics={"val-mse": 0.0}, name="H")  # as many eyes as it may claim
@example(count=1e300, metrics={"val-mse": 0.0}, name="H")  # all the weight
@example(count=20, metrics={"val-mse": -1e300}, name="H")  # an impossible error
@example(count=0, metrics={"val-mse": []}, name="H")  # a list where one number is read
@given(
    count=st.integers(min_value=0, max_value=3 * 10) | COUNTS,
    metrics=st.dictionaries(
        st.sampled_from(["val-mse", "num-val", "val-mae", "x y", "zz"]), METRIC_VALUES, max_size=4
    ),
    name=st.sampled_from(["H", "H", "H", "A", "../H", 7]),
)
def test_a_hostile_evaluate_reply_cannot_crash_or_skew_the_validation(count, metrics, name):
    """The final evaluation's validation MSE (which can select the best model) stays a mean
    of plausible values, with the hostile site weighted by at most its first validation count."""
    fed = Federation(model(), Nodes([*HONEST, HOSTILE]), {"max-site-examples": CAP})
    first_val = 10
    fed.train(
        lambda g: [
            *honest_replies(g),
            train_reply(
                HOSTILE,
                arrays(g),
                "H",
                {"num-examples": 10, "unit-weight": 1.0, "num-val": first_val},
            ),
        ]
    )
    s = fed.strategy
    s.current, s._sampled["evaluate"] = {"round": 2}, [*HONEST, HOSTILE]
    honest = [
        evaluate_reply(n, site, {"num-examples": 5, "val-mse": 4.0})
        for n, (site, _) in HONEST.items()
    ]
    sent = {**metrics, **({"num-examples": count} if count is not None else {})}
    aggregate = s.aggregate_evaluate(2, [*honest, evaluate_reply(HOSTILE, name, sent)])
    assert aggregate is not None and math.isfinite(aggregate["val-mse"])
    event("hostile evaluate reply " + ("refused" if "rejected" in s.current else "aggregated"))
    if "H" in s.current.get("sites", {}) and "val-mse" in sent and "rejected" not in s.current:
        weight = float(count)
        assert weight <= GROWTH * first_val
        assert aggregate["val-mse"] >= 0
        shift = abs(aggregate["val-mse"] - 4.0)
        most = GROWTH * first_val / (GROWTH * first_val + 10)
        assert shift <= most * abs(float(sent["val-mse"]) - 4.0) + 1e-9
    else:
        assert aggregate["val-mse"] == 4.0
