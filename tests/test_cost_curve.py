"""The cost curve's parts: the coordinator's meter, round times, bytes, the growth fit and the
`remdr-bench federation --sites` flag (the federations themselves: `remdr-bench federation
--sites 2,4,8,16`, docs/federation.md#the-cost-curve)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from remdr.cli import bench
from remdr.ops.cost_curve import CurvePoint, bytes_per_round, format_curve, round_times, slope
from remdr.ops.process_cost import MARK, CoordinatorMeter, is_coordinator

BUSY = "import time; t = time.process_time()\nwhile time.process_time() - t < 1.0: pass"


@pytest.mark.parametrize(
    "cmdline, coordinator",
    [("python flower-superlink --insecure", True),
     ("python flwr-simulation --runtime-api-address 127.0.0.1:1", True),
     ("python flwr-serverapp --serverappio-api-address x", True),
     ("python flower-superexec --plugin-type serverapp", True),
     ("python flower-superexec --plugin-type clientapp", False),
     ("python flower-supernode --superlink 127.0.0.1:9092", False),
     ("python remdr-client start --superlink 127.0.0.1:9092", False),
     ("ray::ClientAppActor.run", False)],
)  # fmt: skip
def test_the_coordinator_is_the_superlink_and_the_serverapp_never_a_site(cmdline, coordinator):
    assert is_coordinator(cmdline) is coordinator


def test_the_meter_counts_the_marked_coordinator_processes_only():
    clean = {k: v for k, v in os.environ.items() if k != MARK}
    with CoordinatorMeter(interval=0.1) as meter:
        # both named as a coordinator; only the first inherits the mark
        ours = subprocess.Popen([sys.executable, "-c", BUSY, "flwr-simulation"])
        other = subprocess.Popen([sys.executable, "-c", BUSY, "flwr-simulation"], env=clean)
        ours.wait(60), other.wait(60)
    assert MARK not in os.environ or os.environ[MARK] != meter.value
    cost = meter.cost
    assert 0.5 < cost.cpu_seconds < 1.5, cost  # one second of CPU, not two
    assert cost.peak_rss_bytes > 1e6


def test_a_rounds_overhead_is_its_seconds_less_its_slowest_site():
    rounds = [
        {"round": 1, "seconds": 10.0, "sites": {"A": {"train-seconds": 2.0}, "B": {"train-seconds": 4.0}}},
        {"round": 2, "seconds": 8.0, "sites": {"A": {"train-seconds": 3.0}}},
        {"round": 3, "seconds": 12.0, "sites": {}},
        {"round": 3, "sites": {}},  # the final evaluation: no round of its own
    ]  # fmt: skip
    assert round_times(rounds) == (10.0, 6.0)  # medians of (10, 8, 12) and (6, 5, 12)


def test_bytes_grow_with_sites_and_with_the_model():
    assert bytes_per_round(4, 4, 1000) == 4 * 1000 * 2.25  # down, the final evaluation's share, up
    assert bytes_per_round(8, 4, 1000) == 2 * bytes_per_round(4, 4, 1000)
    assert bytes_per_round(4, 4, 2000) == 2 * bytes_per_round(4, 4, 1000)


def test_the_growth_per_site_is_a_least_squares_line():
    assert slope([2, 4, 8], [5, 9, 17]) == pytest.approx((1.0, 2.0))
    assert slope([2], [7.0]) == (7.0, 0.0)


def test_the_curve_table_has_a_row_per_point_and_a_projection_per_mode():
    pts = [
        CurvePoint("simulation", n, 3, 1.0 + n, 0.5 * n, 0.1 * n, 300 + n, n * 1e6, 400_000)
        for n in (2, 4)
    ]
    text = format_curve(pts, project=50)
    assert "| simulation | 4 | 5.0 | 2.0 | 0.4 | 304.0 | 4.00 |" in text
    assert "round s +1 s" in text and "projected to 50 sites" in text and "round s ≈ 51" in text


@pytest.mark.parametrize("sites", ["0", "2,x", "", "27"])
def test_bad_site_counts_are_one_line(capsys, sites):
    assert bench.main(["federation", "--sites", sites]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--sites" in err[0]
