"""The cost curve: how a round's time, the coordinator's CPU and memory, and the bytes it moves
grow with the number of sites (`remdr-bench federation --sites 2,4,8,16`).

Each point is a fresh federation of the tiny model (`remdr.ops.loopback.TINY`, `concat`, one
local epoch of `eyes_per_site` eyes per round): in simulation (`remdr-sim`, run as a command,
on a private Ray cluster with one CPU per virtual site) or deployed on loopback (the README's
recipe through `remdr.ops.federation_bench`). The coordinator's processes are metered while it
runs (`remdr.ops.process_cost`); bytes per round are what the coordinator sends (the model to
every site, plus the final evaluation spread over the rounds) and receives (each site's
trained model). A least-squares line over the points gives the growth per site, and the
projection to a larger study.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from remdr.ops.process_cost import CoordinatorMeter

BIN = Path(sys.executable).parent
TEST_FRACTION = 0.2  # remdr-sim's default: patients kept apart as the global test set


@dataclass
class CurvePoint:
    mode: str  # "simulation" or "deployment"
    sites: int
    rounds: int
    round_seconds: float  # median over the rounds
    overhead_seconds: float  # median of a round's seconds minus its slowest site's training
    coordinator_cpu_seconds: float  # per round: the whole run's coordinator CPU / rounds
    coordinator_peak_mb: float
    bytes_per_round: float  # coordinator -> sites and back
    model_bytes: int  # one copy of the model as sent


def round_times(rounds: list[dict]) -> tuple[float, float]:
    """(median round seconds, median overhead) of a coordinator report's round records."""
    seconds, overhead = [], []
    for rec in rounds:
        if "seconds" not in rec:
            continue
        train = [m.get("train-seconds", 0.0) for m in rec.get("sites", {}).values()]
        seconds.append(float(rec["seconds"]))
        overhead.append(float(rec["seconds"]) - max(train, default=0.0))
    if not seconds:
        return math.nan, math.nan
    return statistics.median(seconds), statistics.median(overhead)


def bytes_per_round(sites: int, rounds: int, model_bytes: int) -> float:
    """The model down to every site each round (and once more for the final evaluation, spread
    over the rounds) and each site's trained model back."""
    return sites * model_bytes * (1.0 + 1.0 / rounds + 1.0)


def simulate(sites: int, rounds: int = 3, eyes_per_site: int = 32) -> CurvePoint:
    from remdr.ops.federation_bench import _model_sizes
    from remdr.ops.loopback import EXPERIMENT

    n = math.ceil(sites * eyes_per_site / (1 - TEST_FRACTION))
    with tempfile.TemporaryDirectory(prefix="remdr-cost-sim-") as tmp:
        out = Path(tmp) / "sim"
        cmd = [
            str(BIN / "remdr-sim"), "--sites", str(sites), "--rounds", str(rounds),
            "--partition", "iid", "--synthetic-n", str(n), "--local-epochs", "1",
            "--image-size", "32", "--n-bscans", "2", "--set", "embed-dim=16",
            "--set", "fusion-hidden=16", "--set", "batch-size=8", "--device", "cpu",
            "--cpus-per-site", "1", "--ray-address", "local", "--quiet", "--out", str(out),
        ]  # fmt: skip
        with CoordinatorMeter() as meter:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=600 + 120 * rounds)
        if res.returncode != 0:
            raise RuntimeError(f"remdr-sim with {sites} sites failed:\n{res.stderr[-3000:]}")
        report = json.loads((out / "report.json").read_text())
    recs = report["federation"]["rounds"]
    seconds, overhead = round_times(recs)
    _, sent = _model_sizes(EXPERIMENT)
    cost = meter.cost
    return CurvePoint(
        "simulation", sites, rounds, seconds, overhead, cost.cpu_seconds / rounds,
        cost.peak_rss_bytes / 1e6, bytes_per_round(sites, rounds, sent), sent,
    )  # fmt: skip


def deploy(sites: int, rounds: int = 3, eyes_per_site: int = 32) -> CurvePoint:
    from remdr.ops.federation_bench import measure

    cost = measure(rounds, sites, eyes_per_site)
    seconds = statistics.median(r.seconds for r in cost.rounds)
    return CurvePoint(
        "deployment", sites, rounds, seconds, cost.median_overhead,
        cost.coordinator.cpu_seconds / rounds, cost.coordinator.peak_rss_bytes / 1e6,
        bytes_per_round(sites, rounds, cost.payload_bytes), cost.payload_bytes,
    )  # fmt: skip


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys on xs; slope 0 with one point."""
    if len(xs) < 2:
        return (ys[0] if ys else math.nan), 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


FIELDS = {  # column: (CurvePoint attribute, unit)
    "round s": ("round_seconds", "s"),
    "overhead s": ("overhead_seconds", "s"),
    "coord CPU s/round": ("coordinator_cpu_seconds", "s"),
    "coord peak MB": ("coordinator_peak_mb", "MB"),
    "MB/round": ("bytes_per_round", "MB"),
}


def _value(point: CurvePoint, attr: str) -> float:
    v = getattr(point, attr)
    return v / 1e6 if attr == "bytes_per_round" else v


def format_curve(points: list[CurvePoint], project: int = 50) -> str:
    """A markdown table of the points, then per mode the growth per site and the projection to
    `project` sites."""
    head = "| mode | sites | " + " | ".join(FIELDS) + " |"
    lines = [head, "|" + "---|" * (2 + len(FIELDS))]
    for p in points:
        vals = " | ".join(f"{_value(p, attr):.2f}" if attr == "bytes_per_round"
                          else f"{_value(p, attr):.1f}" for attr, _ in FIELDS.values())  # fmt: skip
        lines.append(f"| {p.mode} | {p.sites} | {vals} |")
    for mode in dict.fromkeys(p.mode for p in points):
        pts = [p for p in points if p.mode == mode]
        xs = [float(p.sites) for p in pts]
        growth, at = [], []
        for name, (attr, unit) in FIELDS.items():
            a, b = slope(xs, [_value(p, attr) for p in pts])
            growth.append(f"{name} {b:+.3g} {unit}")
            at.append(f"{name} ≈ {a + b * project:.3g}")
        model = pts[-1].model_bytes
        lines.append(
            f"\n{mode}, growth per added site: " + "; ".join(growth)
            + f". Bytes per round = sites x {2 + 1 / pts[-1].rounds:.2f} x the model "
            f"({model / 1e6:.3f} MB as sent here), so linear in the model's bytes too."
        )  # fmt: skip
        lines.append(f"{mode}, projected to {project} sites (linear): " + "; ".join(at) + ".")
    return "\n".join(lines)
