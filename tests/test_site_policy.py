"""A site's own policy holds whatever the coordinator's run config says (issue 23, points 1-6):
its epsilon ceiling and delta (the run config may only lower them), the ClientApp it runs, the
metrics it shares, who of its patients trains, and where its state is written.

The end-to-end versions, on real Flower processes, are in `test_hostile_coordinator.py`."""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

import pytest
from flwr.app import MessageType
from remdr.client.app import PRIVACY_DECLINED
from site_app import app
from test_client_app import RUN_CONFIG, _context, _initial, _message

from remdr.errors import ConfigError
from remdr.federation.site_state import SiteState
from remdr.privacy import PrivacyLedger

# One batch holds every training patient (q = 1) and one epoch is one step, so a round spends
# exactly epsilon(sigma, q=1, 1 step): at sigma 0.3 about 20 (delta 1e-5); at sigma 0.5, 10.7 at
# delta 1e-5 but 6.4 at delta 0.02.
DP_ONE_STEP = {**RUN_CONFIG, "method": "remdr_dp", "oct-view": "rnflt", "batch-size": 256}
SITE_DEFAULT_CEILING = 10.0  # remdr.client.site_policy.SITE_EPSILON_MAX, docs/privacy.md


def _train(tiny_data, run_config: dict, **node):
    ctx = _context(tiny_data, run_config, **node)
    model = _initial({k: v for k, v in run_config.items() if k != "share-metrics"})
    return app(_message(MessageType.TRAIN, model, {"server-round": 1}), ctx)


def _declined(reply) -> str:
    assert reply.has_error(), "the site trained"
    reason = reply.error.reason
    assert reply.error.code == PRIVACY_DECLINED and "\n" not in reason, reason
    return reason


# -- 1. the ceiling ----------------------------------------------------------------------------


def test_a_site_without_its_own_ceiling_still_has_one(tiny_data, tmp_path):
    """Started without --epsilon-max, the site keeps its default ceiling: a run config asking
    for 1e9 cannot lift it, and the declined round spends nothing."""
    ledger = tmp_path / "hospA.jsonl"
    hostile = {**DP_ONE_STEP, "dp-noise": 0.3, "dp-epsilon-max": 1e9}
    reason = _declined(_train(tiny_data, hostile, ledger=str(ledger)))
    assert "privacy budget" in reason and f"ceiling {SITE_DEFAULT_CEILING:g}" in reason
    assert PrivacyLedger(ledger).entries() == []


def test_check_only_shows_the_sites_privacy_policy(tiny_data, capsys):
    from remdr.client import cli as client_cli

    assert client_cli.main(["start", "--data", str(tiny_data), "--check-only"]) == 0
    out = capsys.readouterr().out
    assert f"epsilon ceiling {SITE_DEFAULT_CEILING:g} (site default)" in out
    assert "delta 1e-05" in out and "metrics shared: full" in out
    assert client_cli.main(["start", "--data", str(tiny_data), "--check-only", "--require-dp",
                            "--epsilon-max", "3", "--delta", "1e-6"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "epsilon ceiling 3 (--epsilon-max)" in out and "delta 1e-06 (--delta)" in out
    assert "metrics shared: minimal" in out
    # a delta above 1/patients would void the accounting: one line, before anything starts
    assert (
        client_cli.main(["start", "--data", str(tiny_data), "--check-only", "--delta", "0.1"]) == 2
    )
    err = capsys.readouterr().err
    assert "--delta 0.1" in err and "1/24" in err and len(err.strip().splitlines()) == 1


# -- 2. delta ----------------------------------------------------------------------------------


def test_the_run_config_cannot_raise_delta(tiny_data, tmp_path):
    """A larger delta buys more rounds under the same ceiling: at delta 0.02 this round costs
    6.4, under the ceiling; at the site's delta it costs 10.7, above it."""
    ledger = tmp_path / "hospA.jsonl"
    hostile = {**DP_ONE_STEP, "dp-noise": 0.5, "dp-delta": 0.02}
    reason = _declined(_train(tiny_data, hostile, ledger=str(ledger)))
    assert "privacy budget" in reason and "delta 1e-05" in reason
    assert PrivacyLedger(ledger).entries() == []


def test_the_sites_delta_is_below_one_over_its_patients():
    from remdr.client.site_policy import SitePolicy, default_delta

    assert default_delta(50) == 1e-5
    assert default_delta(50_000) == pytest.approx(1 / 500_000)
    assert SitePolicy().site_delta(50_000) == default_delta(50_000)
    assert SitePolicy(delta=1e-7).site_delta(50) == 1e-7


def test_a_bad_policy_in_the_node_config_is_one_line():
    from remdr.client.site_policy import SitePolicy

    with pytest.raises(ConfigError) as err:
        SitePolicy.from_node_config({"epsilon-max": "lots", "share-metrics": "everything"})
    assert "\n" not in str(err.value) and "epsilon-max" in str(err.value)
    assert "share-metrics" in str(err.value)


# -- 3. the ClientApp a site runs --------------------------------------------------------------


def _installed_bundle(home: Path, clientapp: str, *extra: str) -> Path:
    """A bundle as Flower's ClientApp process installs it: <FLWR_HOME>/apps/<id>.<hash>/."""
    from remdr.federation.app_bundle import bundle_pyproject

    folder = home / "apps" / "remdr.remdr-federation.0.1.0.0123456789"
    folder.mkdir(parents=True)
    text = bundle_pyproject().replace('"remdr.client.app:app"', f'"{clientapp}"')
    (folder / "pyproject.toml").write_text(text)
    for name in extra:
        (folder / name).write_text("app = None\n")
    return folder


@pytest.mark.parametrize(
    "clientapp, extra, node, refused",
    [
        ("remdr.client.app:app", (), {}, None),
        ("remdr.client.fault_drill:app", (), {}, "remdr.client.fault_drill:app"),
        ("remdr.client.fault_drill:app", (), {"fault-drill": "allow"}, None),
        ("evil:app", ("evil.py",), {}, "evil:app"),
        ("remdr.client.app:app", ("opacus.py",), {}, "opacus.py"),
    ],
)
def test_a_site_runs_only_the_installed_remdr_clientapp(
    tiny_data, tmp_path, monkeypatch, clientapp, extra, node, refused
):
    from remdr.client.bundle_check import bundle_problem

    home = tmp_path / "flwr-home"
    folder = _installed_bundle(home, clientapp, *extra)
    monkeypatch.setenv("FLWR_HOME", str(home))
    problem = bundle_problem(node, [str(folder), *sys.path])
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "\n" not in problem
    assert bundle_problem(node, sys.path) is None  # not loaded from a bundle: a direct call


def test_the_clientapp_refuses_a_foreign_bundle_before_training(tiny_data, tmp_path, monkeypatch):
    from remdr.client.app import BUNDLE_REFUSED

    home = tmp_path / "flwr-home"
    folder = _installed_bundle(home, "remdr.client.fault_drill:app")
    monkeypatch.setenv("FLWR_HOME", str(home))
    monkeypatch.syspath_prepend(str(folder))
    ledger = tmp_path / "hospA.jsonl"
    reply = _train(tiny_data, {**DP_ONE_STEP, "dp-noise": 2.0}, ledger=str(ledger))
    assert reply.has_error() and reply.error.code == BUNDLE_REFUSED
    assert "fault_drill" in reply.error.reason and "--allow-fault-drill" in reply.error.reason
    assert not ledger.exists()


# -- 4. the metrics a site shares --------------------------------------------------------------


def test_a_site_that_requires_dp_shares_the_minimal_metrics(tiny_data, tmp_path):
    """The same keys as any site (Flower aggregates only replies with equal keys), but only the
    minimal set carries values; the rest are NaN (withheld)."""
    private = {**DP_ONE_STEP, "dp-noise": 2.0}
    ctx = _context(tiny_data, private, **{"require-dp": "true", "ledger": str(tmp_path / "l")})
    reply = app(_message(MessageType.EVALUATE, _initial(private), {"server-round": 1}), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = dict(reply.content["metrics"])
    assert m["num-examples"] > 0 and m["num-val"] > 0 and math.isfinite(m["val-mse"])
    assert "val-mae" in m and math.isnan(m["val-mae"])
    assert math.isnan(m["val-mae-normal"]) and math.isnan(m["val-mae-bin-avg"])


def test_per_bin_metrics_need_enough_patients_in_the_bin():
    from remdr.client.metrics_policy import share_metrics

    metrics = {
        "num-examples": 40, "unit-weight": 1.0, "num-val": 12, "val-mse": 4.0, "val-mae": 1.5,
        "train-loss": 0.3, "val-mae-normal": 1.0, "val-mae-early": 2.0,
        "val-mae-moderate": float("nan"), "val-mae-severe": 6.0, "val-mae-bin-avg": 3.0,
        "received-val-mse": 5.0, "received-val-mae-severe": 7.0, "dp-epsilon": 2.0,
        "something-new": 1.0,
    }  # fmt: skip
    patients = {"val": {"normal": 10, "early": 11, "moderate": 0, "severe": 1}}
    full = share_metrics(metrics, "full", patients, min_bin_patients=10)
    assert set(full) == set(metrics)
    assert full["val-mae-normal"] == 1.0 and full["val-mae-early"] == 2.0
    assert math.isnan(full["val-mae-severe"]) and math.isnan(full["received-val-mae-severe"])
    assert math.isnan(full["val-mae-bin-avg"])  # it would give the severe bin away
    assert full["something-new"] == 1.0
    standard = share_metrics(metrics, "standard", patients, min_bin_patients=10)
    assert standard["val-mae"] == 1.5 and standard["train-loss"] == 0.3
    assert math.isnan(standard["val-mae-normal"]) and math.isnan(standard["something-new"])
    minimal = share_metrics(metrics, "minimal", patients, min_bin_patients=10)
    kept = {k for k, v in minimal.items() if not math.isnan(v)}
    assert kept == {"num-examples", "unit-weight", "num-val", "val-mse", "received-val-mse",
                    "dp-epsilon"}  # fmt: skip
    enough = {"val": {"normal": 10, "early": 11, "moderate": 0, "severe": 10}}
    assert share_metrics(metrics, "full", enough, min_bin_patients=10)["val-mae-bin-avg"] == 3.0


def test_a_run_config_asking_for_more_metrics_than_the_site_shares_is_declined(tiny_data, tmp_path):
    ledger = tmp_path / "hospA.jsonl"
    asks = {**DP_ONE_STEP, "dp-noise": 2.0, "share-metrics": "full"}
    reason = _declined(_train(tiny_data, asks, ledger=str(ledger), **{"require-dp": "true"}))
    assert "share-metrics=full" in reason and "minimal" in reason
    assert not ledger.exists()


# -- 5. who trains -----------------------------------------------------------------------------


def test_adding_a_patient_moves_no_other_patient_between_train_and_validation(tiny_data):
    from remdr.data import load_dataset
    from remdr.data.splits import split_by_key

    records = load_dataset(tiny_data, quiet=True).records
    key = b"a site's secret"
    before = split_by_key(records[:-2], 0.3, key)
    after = split_by_key(records, 0.3, key)
    for part in ("train", "val"):
        moved = {r.eye_id for r in before[part]} - {r.eye_id for r in after[part]}
        assert not moved
    assert before["val"] and before["train"]
    other = split_by_key(records, 0.3, b"another site")
    assert {r.eye_id for r in other["val"]} != {r.eye_id for r in after["val"]}


def test_the_coordinators_seed_does_not_choose_the_sites_validation_patients(tiny_data, tmp_path):
    """Two runs with different seeds: the site validates the same model on the same patients."""
    ledger = tmp_path / "hospA.jsonl"
    scores = []
    for seed in (0, 1, 2):
        run_config = {**RUN_CONFIG, "seed": seed}
        ctx = _context(tiny_data, run_config, ledger=str(ledger))
        msg = _message(MessageType.EVALUATE, _initial(RUN_CONFIG), {"server-round": 1})
        scores.append(app(msg, ctx).content["metrics"]["val-mse"])
    assert scores[0] == scores[1] == scores[2]


def test_the_split_key_is_the_sites_secret_kept_beside_its_ledger(tmp_path):
    from remdr.client.site_handlers import split_key

    ledger = tmp_path / "hospA" / "privacy-ledger.jsonl"
    key = split_key({"ledger": str(ledger), "site-id": "hospA"})
    assert key == split_key({"ledger": str(ledger), "site-id": "hospA"}) and len(key) == 32
    files = list((tmp_path / "hospA").rglob("split-key"))
    assert len(files) == 1 and files[0].stat().st_mode & 0o077 == 0
    # without a ledger of its own (a simulated site), the key comes from the site id
    assert split_key({"site-id": "site-0"}) == split_key({"site-id": "site-0"}) != key


# -- 6. where the site writes ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["..", ".", "", "a/b", "../x", "x\\y", "..."])
def test_a_run_key_that_is_not_a_plain_name_is_refused(tmp_path, key):
    with pytest.raises(ConfigError) as err:
        SiteState(tmp_path / "state", key)
    assert "\n" not in str(err.value)


def test_a_hostile_run_key_is_a_one_line_error_reply_and_writes_nothing(tiny_data, tmp_path):
    ledger = tmp_path / "site" / "hospA.jsonl"
    ledger.parent.mkdir()
    run_config = {**RUN_CONFIG, "fedbn": True}
    ctx = _context(tiny_data, run_config, ledger=str(ledger))
    msg = _message(MessageType.TRAIN, _initial(run_config), {"server-round": 1, "remdr-run": ".."})
    reply = app(msg, ctx)
    assert reply.has_error() and "remdr-run" in reply.error.reason
    assert "\n" not in reply.error.reason
    assert sorted(p.name for p in tmp_path.iterdir()) == ["site"]  # nothing beside the folder
    assert not list((tmp_path / "site").rglob("round-*"))


def test_the_policy_round_trips_through_the_node_config():
    from remdr.client.site_policy import SitePolicy

    policy = SitePolicy(
        epsilon_max=3.0, delta=1e-7, require_dp=True, share_metrics="standard",
        min_bin_patients=20, allow_fault_drill=True,
    )  # fmt: skip
    assert SitePolicy.from_node_config(policy.node_config()) == policy
    assert SitePolicy.from_node_config({}) == SitePolicy()
    assert dataclasses.replace(SitePolicy(), require_dp=True).metrics_level == "minimal"
    assert SitePolicy().metrics_level == "full"
