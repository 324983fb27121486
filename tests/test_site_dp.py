"""Site-level DP releases what its accounting says, whoever replies; per-site numbers stay per site.

The strategy is driven with constructed Messages (as in test_faults.py): three sites are asked,
one update is refused or one site never replies, and the release must still have multiplier z
(noise std z*C/m for a release whose sensitivity is C/m) and be journalled exactly as made.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import ArrayRecord as _ArrayRecord
from flwr.app import Metadata as FlwrMetadata
from remdr.server.reply_metrics import aggregate_metrics
from remdr.server.site_dp import site_level_privacy
from remdr.server.strategy import build_strategy

from remdr.federation.run_config import split_run_config
from remdr.federation.run_directory import RunDirectory
from remdr.privacy import epsilon_of


def ArrayRecord(arrays: dict[str, np.ndarray]) -> _ArrayRecord:  # noqa: N802
    return _ArrayRecord({k: Array(v) for k, v in arrays.items()})


N = 100_000  # coordinates: the noise's standard deviation is measured to about 0.5 %


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return self.nodes


def _reply(node: int, arrays: dict[str, np.ndarray], site: str) -> Message:
    meta = FlwrMetadata(
        run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
        reply_to_message_id=f"q{node}", group_id="1", created_at=time.time(), ttl=60.0,
        message_type="train",
    )  # fmt: skip
    content = RecordDict(
        {
            "arrays": ArrayRecord(arrays),
            "metrics": MetricRecord({"num-examples": 10, "unit-weight": 1.0}),
            "site": ConfigRecord({"site-id": site}),
        }
    )
    return Message(content=content, metadata=meta)


def _dp_round(kind: str, noise: float, clip: float = 1.0, mode: str = "fixed"):
    """Three sites asked; sites A and B send an update of norm 5C along the first coordinate;
    site C's update is refused (NaN) or it never replies. Returns (strategy, global, release)."""
    fed_keys = {
        "min-nodes": 3, "node-wait": 0.0, "site-dp": mode, "group-norm": "true",
        "site-dp-noise": noise, "site-dp-clip": clip,
    }  # fmt: skip
    _, fed = split_run_config(fed_keys)
    strategy = build_strategy(fed)
    g = {"w": np.zeros(N, np.float32)}
    msgs = list(strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), _Grid([1, 2, 3])))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 2, 3]
    good = np.zeros(N, np.float32)
    good[0] = 5 * clip
    replies = [_reply(1, {"w": good}, "A"), _reply(2, {"w": good}, "B")]
    if kind == "rejected":
        replies.append(_reply(3, {"w": np.full(N, np.nan, np.float32)}, "C"))
    np.random.seed(0)
    arrays, _ = strategy.aggregate_train(1, replies)
    return strategy, arrays.to_numpy_ndarrays()[0]


@pytest.mark.parametrize("kind", ["missing", "rejected"])
def test_site_dp_noise_is_calibrated_to_the_cohort_not_to_who_replied(in_a_run, kind, tmp_path):
    """Two of three sites aggregated: the release is (clipped sum)/3 + N(0, (zC/3)^2). One
    site's update moves it by C/3 and the noise is zC/3: multiplier z, as the report says."""
    z, clip = 0.05, 1.0
    strategy, released = _dp_round(kind, z, clip)
    signal = released[0]  # the two clipped updates' first coordinate, C each, over m = 3
    assert signal == pytest.approx(2 * clip / 3, abs=0.1)
    assert float(np.std(released[1:])) == pytest.approx(z * clip / 3, rel=0.02)
    # per-site sensitivity C/3 against noise zC/3: multiplier z (before: sensitivity C/2, z*2/3)
    assert (float(np.std(released[1:])) / (signal / 2)) == pytest.approx(z, rel=0.1)
    release = strategy.current["site_dp_release"]
    assert release["cohort"] == 3 and release["aggregated"] == 2
    assert release["noise_multiplier"] == z and release["noise_std"] == pytest.approx(z * clip / 3)
    assert strategy.current["aggregated"] == ["A", "B"]


def test_site_dp_release_is_journalled_and_accounted_as_made(in_a_run, tmp_path):
    run = RunDirectory(tmp_path / "run")
    _, fed = split_run_config(
        {"min-nodes": 3, "node-wait": 0.0, "site-dp": "fixed", "group-norm": "true"}
    )
    strategy = build_strategy(fed)
    strategy.on_release = run.record_release
    g = {"w": np.zeros(8, np.float32)}
    strategy.configure_train(1, ArrayRecord(g), ConfigRecord(), _Grid([1, 2, 3]))
    strategy.aggregate_train(1, [_reply(1, {"w": np.ones(8, np.float32)}, "A")])
    (entry,) = run.releases()
    assert entry["cohort"] == 3 and entry["aggregated"] == 1 and entry["noise_multiplier"] == 1.0
    site = site_level_privacy(fed, run.releases())
    assert site["releases"] == 1
    assert site["epsilon"] == pytest.approx(epsilon_of([(1.0, 1.0, 1)], fed.site_dp_delta))


def test_adaptive_clipping_noises_with_the_norm_it_clipped_to(in_a_run):
    """Flower moves the adaptive norm before noising; every update here is clipped, so the norm
    shrinks, and the release must still carry noise for the norm the updates were clipped to."""
    z, clip = 0.1, 1.0
    strategy, released = _dp_round("missing", z, clip, mode="adaptive")
    inner = strategy.inner
    z_updates = float(inner.noise_multiplier)  # Flower's share of z for the updates
    assert z_updates > z
    assert float(np.std(released[1:])) == pytest.approx(z_updates * clip / 3, rel=0.02)
    assert inner.clipping_norm < clip  # the next round's norm moved after the release
    release = strategy.current["site_dp_release"]
    assert release["clip"] == clip and release["count_noise"] == pytest.approx(3 / 20)
    # both noisy quantities (update sum and clipped count) are accounted
    _, fed = split_run_config(
        {"min-nodes": 3, "site-dp": "adaptive", "group-norm": "true", "site-dp-noise": z}
    )
    eps = site_level_privacy(fed, [release])["epsilon"]
    assert eps == pytest.approx(epsilon_of([(z_updates, 1.0, 1), (3 / 20, 1.0, 1)], 1e-5))


def test_adaptive_site_dp_that_flower_cannot_build_is_a_config_error():
    from remdr.errors import ConfigError

    with pytest.raises(ConfigError, match="min-nodes/10"):
        split_run_config({"min-nodes": 3, "site-dp": "adaptive", "group-norm": "true"})


def test_privacy_spend_and_site_test_metrics_are_not_averaged_across_sites():
    recs = [
        RecordDict(
            {
                "m": MetricRecord(
                    {"num-examples": n, "val-mse": v, "dp-epsilon": e, "test-mse": t, "num-test": 4}
                )
            }
        )  # fmt: skip
        for n, v, e, t in ((30, 2.0, 1.0, 9.0), (10, 6.0, 7.0, 1.0))
    ]
    out = aggregate_metrics(recs, "num-examples")
    assert out["val-mse"] == pytest.approx(3.0)
    assert not [k for k in out if k.startswith(("dp-", "test-", "num-test"))]


def test_site_dp_noise_is_not_replayable_from_the_run_seed():
    """The initial model is seeded by the run seed; Flower's site-level DP noise (NumPy's global
    generator) drawn afterwards must not be."""
    from remdr.server.app import initial_state
    from test_client_app import RUN_CONFIG

    draws = []
    for _ in range(2):
        initial_state(Context(1, 0, {}, RecordDict(), dict(RUN_CONFIG)))
        draws.append(np.random.normal(size=4))
    assert not np.array_equal(*draws)
