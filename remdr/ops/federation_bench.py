"""What a deployment round costs beyond training: a real loopback federation, timed per round.

Starts a SuperLink and N SuperNodes through `remdr-server` / `remdr-client` (the README's
one-machine recipe), runs the tiny experiment for some rounds and reads the coordinator's round
records: a round's wall time, the slowest site's on-site training time, and their difference
(the overhead: process starts, imports, data loading, polling, transfers, evaluation). Bytes are
the model payload the coordinator sends each site per round, relative to the fp32 model.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from remdr.ops.loopback import EXPERIMENT, Loopback, make_sites, write_experiment
from remdr.ops.process_cost import CoordinatorCost, CoordinatorMeter


@dataclass
class RoundCost:
    round: int
    seconds: float
    train_seconds: float  # the slowest site's on-site training

    @property
    def overhead(self) -> float:
        return self.seconds - self.train_seconds


@dataclass
class FederationCost:
    rounds: list[RoundCost] = field(default_factory=list)
    model_bytes_fp32: int = 0
    payload_bytes: int = 0  # one copy of the state dict as sent (fp32 weights, int counters)
    messages_per_round: float = 0.0  # coordinator -> one site, averaged over the rounds
    setup_seconds: float = 0.0
    # the SuperLink, its ServerApp and `remdr-server` over the whole run (start-up included)
    coordinator: CoordinatorCost = field(default_factory=CoordinatorCost)

    @property
    def median_overhead(self) -> float:
        return statistics.median(r.overhead for r in self.rounds) if self.rounds else float("nan")

    @property
    def bytes_ratio(self) -> float:
        return self.messages_per_round * self.payload_bytes / max(1, self.model_bytes_fp32)


def _model_sizes(experiment: dict) -> tuple[int, int]:
    """(fp32 bytes of the parameters and buffers, bytes of the state dict as sent)."""
    from remdr.config import ExperimentConfig, apply_overrides, flat_values
    from remdr.methods import build_model

    known = flat_values(ExperimentConfig())
    cfg = apply_overrides(ExperimentConfig(), {k: v for k, v in experiment.items() if k in known})
    state = build_model(cfg).state_dict()
    fp32 = sum(t.numel() * 4 for t in state.values())
    sent = sum(t.numel() * t.element_size() for t in state.values())
    return fp32, sent


def measure(
    rounds: int = 3, sites: int = 2, eyes_per_site: int = 32, overrides: dict | None = None
) -> FederationCost:
    """Run the loopback federation and return its per-round costs; everything started is
    stopped before returning, also on failure."""
    experiment = {
        **EXPERIMENT,
        "num-server-rounds": rounds,
        "min-nodes": sites,
        **(overrides or {}),
    }
    with tempfile.TemporaryDirectory(prefix="remdr-bench-federation-") as tmp:
        root = Path(tmp)
        names = [chr(ord("A") + i) for i in range(sites)]
        data = make_sites(root / "data", names, n=eyes_per_site)
        out = root / "coord-run"
        path = write_experiment(root / "experiment.toml", **{**experiment, "out-dir": str(out)})
        # the sites share this machine as they would not in deployment: each gets its share of
        # the cores (remdr-client --threads), as the simulator's --cpus-per-site does
        fed = Loopback(root, sites_per_machine=sites)
        start = time.perf_counter()
        with CoordinatorMeter() as meter:  # its mark is in every process started here
            try:
                fed.start_superlink()
                for name, folder in data.items():
                    fed.start_site(name, folder)
                setup = time.perf_counter() - start
                if fed.run(path, timeout=300 + 300 * rounds) != 0:
                    raise RuntimeError("the benchmark federation failed:\n" + fed.log("run.log"))
            finally:
                meter.sample()
                fed.stop()
        if not (out / "report.json").is_file():  # the run stopped before its report
            raise RuntimeError(
                "the benchmark federation wrote no report:\n" + fed.log("run.log", tail=2000)
            )
        report = json.loads((out / "report.json").read_text())
    cost = FederationCost(setup_seconds=setup, coordinator=meter.cost)
    for rec in report["rounds"]:
        train = [m.get("train-seconds", 0.0) for m in rec.get("sites", {}).values()]
        cost.rounds.append(RoundCost(rec["round"], float(rec["seconds"]), max(train, default=0.0)))
    separate = str(experiment.get("separate-evaluate", False)).lower() == "true"
    # train messages every round; evaluate messages every round, or once for the final model
    cost.messages_per_round = 2.0 if separate else 1.0 + 1.0 / rounds
    cost.model_bytes_fp32, cost.payload_bytes = _model_sizes(experiment)
    return cost


def format_cost(cost: FederationCost, label: str = "") -> str:
    lines = [f"federation benchmark{f' ({label})' if label else ''}: {len(cost.rounds)} rounds"]
    lines.append(f"  {'round':>5s} {'round s':>8s} {'train s':>8s} {'overhead s':>11s}")
    for r in cost.rounds:
        lines.append(f"  {r.round:5d} {r.seconds:8.1f} {r.train_seconds:8.1f} {r.overhead:11.1f}")
    lines.append(f"  median overhead per round: {cost.median_overhead:.1f} s")
    lines.append(
        f"  bytes sent per site per round: {cost.bytes_ratio:.2f} x the fp32 model "
        f"({cost.messages_per_round:.2f} messages of {cost.payload_bytes / 1e6:.2f} MB; "
        f"fp32 model {cost.model_bytes_fp32 / 1e6:.2f} MB)"
    )
    lines.append(f"  start-up (SuperLink + sites): {cost.setup_seconds:.1f} s")
    lines.append(
        f"  coordinator: {cost.coordinator.cpu_seconds:.1f} CPU s over the run, peak "
        f"{cost.coordinator.peak_rss_bytes / 1e6:.0f} MB resident"
    )
    return "\n".join(lines)
