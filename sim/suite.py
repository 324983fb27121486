"""The federation-quality suite: federated against centralized training over the partitions a
multi-site study meets, each at several seeds, with the median and the worst ratio.

    remdr-sim suite --seeds 0,1                     # every case, federated vs centralized
    remdr-sim suite --cases screening-5 --reference concat --fed strategy=fedprox

Each case is a partition of the synthetic default (or `--data`): Dirichlet label skew at
alpha 1, 0.3 and 0.1 over 4-8 sites, quantity skew, a screening network (one large, mostly
normal clinic and small specialist clinics holding the severe eyes) and an incomplete-modality
mix. A seed fixes the partition, the patients' split and the training. Every number a default
is chosen on is a validation number (the sites' validation patients, which the federated and the
centralized model are both scored on); test numbers are reported only.

The centralized arm does not depend on the federation's settings, so it is trained once per
case, seed and training config and kept in `<out>/central/` for later suite runs.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remdr.sim.partition import PartitionSpec
from remdr.sim.simulation import Simulation, run_simulation
from remdr.sim.suite_rows import row_of, summarise, table

from remdr.config import ExperimentConfig
from remdr.data.synthetic import SyntheticSpec


@dataclass(frozen=True)
class Case:
    """One partition of the suite (by patient; the global test set is kept apart first)."""

    name: str
    about: str
    sites: int
    scheme: str = "dirichlet"
    alpha: float = 1.0
    site_modalities: tuple[str, ...] = ()

    def partition(self, seed: int, test_fraction: float = 0.2) -> PartitionSpec:
        return PartitionSpec(
            sites=self.sites,
            scheme=self.scheme,
            alpha=self.alpha,
            test_fraction=test_fraction,
            seed=seed,
            site_modalities=self.site_modalities,
        )


SUITE = (
    Case("dirichlet-a1-4", "mild label skew, 4 sites (the `make sim` split)", 4, alpha=1.0),
    Case("dirichlet-a0.3-5", "strong label skew, 5 sites", 5, alpha=0.3),
    Case("dirichlet-a0.3-8", "strong label skew, 8 smaller sites", 8, alpha=0.3),
    Case("dirichlet-a0.1-4", "extreme label skew, 4 sites", 4, alpha=0.1),
    Case("dirichlet-a0.1-6", "extreme label skew, 6 sites", 6, alpha=0.1),
    Case("quantity-6", "quantity skew: exponential site sizes, 6 sites", 6, scheme="quantity"),
    Case(
        "screening-5",
        "a screening clinic with most normal eyes, 4 specialist clinics with the severe ones",
        5,
        scheme="screening",
    ),
    Case(
        "incomplete-a1-4",
        "two complete and two OCT-only sites, mild label skew",
        4,
        alpha=1.0,
        site_modalities=("both", "oct", "both", "oct"),
    ),
)
CASES = {c.name: c for c in SUITE}


@dataclass
class SuiteRun:
    """What the suite trains: one training config for every case (`cfg`, whose seed the suite
    replaces), the federation's settings, and optionally a reference method federated too."""

    cfg: ExperimentConfig
    out: Path
    cases: tuple[Case, ...] = SUITE
    seeds: tuple[int, ...] = (0, 1)
    data: str = ""
    synthetic_n: int = SyntheticSpec.n  # eyes in the synthetic set, where no `data` is given
    rounds: int = 32
    local_epochs: int = 1
    strategy: str = "fedavg"
    fed: dict[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = ""  # e.g. "concat": federated too, on the same partitions
    cpus_per_site: int = 1
    progress: bool = False
    central_cache: Path | None = None  # default: <out>/central
    central_epochs: int = 0  # > 0: a fixed centralized budget (one arm for every federation)


def _with_seed(cfg: ExperimentConfig, seed: int, method: str | None = None) -> ExperimentConfig:
    train = dataclasses.replace(cfg.train, seed=seed, method=method or cfg.train.method)
    return dataclasses.replace(cfg, train=train)


def case_simulation(run: SuiteRun, case: Case, seed: int) -> Simulation:
    """The simulation of one case at one seed: its partition, the suite's data and settings."""
    sim = Simulation(
        _with_seed(run.cfg, seed),
        out=run.out / f"{case.name}-s{seed}",
        partition=case.partition(seed),
        data=run.data,
        synthetic_n=run.synthetic_n,
        rounds=run.rounds,
        local_epochs=run.local_epochs,
        strategy=run.strategy,
        fed=dict(run.fed),
        compare_centralized=True,
        reference=run.reference,
        progress=run.progress,
    )
    sim.resources.cpus_per_site = run.cpus_per_site
    sim.central_cache = run.central_cache or run.out / "central"
    sim.central_epochs = run.central_epochs
    return sim


def run_case(run: SuiteRun, case: Case, seed: int, say=print) -> dict:
    """One case at one seed: the federation, its centralized arm (cached), the reference."""
    sim = case_simulation(run, case, seed)
    quiet = (lambda _line: None) if not run.progress else say
    return row_of(run_simulation(sim, say=quiet), case.name, seed)


def _settings(run: SuiteRun) -> dict:
    """What a suite's rows were measured under, as `suite.json` stores it."""
    settings = {
        "config": run.cfg.to_dict(), "fed": run.fed, "data": run.data,
        "synthetic_n": run.synthetic_n, "rounds": run.rounds, "local_epochs": run.local_epochs,
        "strategy": run.strategy, "reference": run.reference, "central_epochs": run.central_epochs,
    }  # fmt: skip
    return json.loads(json.dumps(settings, default=str))


def _earlier_rows(run: SuiteRun, settings: dict, say=print) -> list[dict]:
    """The rows an earlier call with the same settings left in `suite.json` for case-seeds this
    call does not run: a suite run in pieces into one folder keeps one table. Rows of other
    settings are not mixed in (their case folders stay until a case is rerun)."""
    path = run.out / "suite.json"
    if not path.exists():
        return []
    ours = {(case.name, seed) for case in run.cases for seed in run.seeds}
    try:
        earlier = json.loads(path.read_text())
        same = {key: earlier.get(key) for key in settings} == settings
        kept = [r for r in earlier["rows"] if (r["case"], r["seed"]) not in ours] if same else []
    except (OSError, ValueError, AttributeError, KeyError, TypeError):
        same, kept = False, []
    if not same:
        say(
            f"{path} holds runs of other settings, is unreadable or was written before remdr "
            "stored its settings: this call's runs replace its table (the case folders stay)"
        )
        return []
    if kept:
        say(f"kept {len(kept)} run(s) of an earlier call with the same settings ({path})")
    return kept


def progress(done: int, total: int, seconds: float) -> str:
    """`3/16, 38.5 min, ~167 min left`: a suite can run for hours; the estimate is the mean
    case so far times the cases still to run."""
    spent = f"{done}/{total}, {seconds / 60:.1f} min"
    if done >= total or done <= 0:
        return spent
    return f"{spent}, ~{(total - done) * seconds / done / 60:.0f} min left"


def run_suite(run: SuiteRun, say=print) -> dict:
    """Every case at every seed; writes `suite.json` and `suite.md` in `run.out` after each
    case, so an interrupted suite keeps what it measured, beside the runs an earlier call with
    the same settings left there."""
    run.out.mkdir(parents=True, exist_ok=True)
    settings = _settings(run)
    rows: list[dict] = _earlier_rows(run, settings, say)
    total, start, ran = len(run.cases) * len(run.seeds), time.monotonic(), 0
    for case in run.cases:
        for seed in run.seeds:
            row = run_case(run, case, seed, say)
            rows.append(row)
            ran += 1
            f, c = row["federated"], row["centralized"]
            say(
                f"{case.name} seed {seed}: val {f['val_mse']:.2f} vs {c['val_mse']:.2f} "
                f"({row['val_ratio']:.2f}x), test {f['test_mse']:.2f} vs {c['test_mse']:.2f} "
                f"({row['test_ratio']:.2f}x), R² {f['test_r2']:.2f} vs {c['test_r2']:.2f}"
                + (
                    f"; {run.reference} test {row['reference']['test_mse']:.2f}"
                    if "reference" in row
                    else ""
                )
                + f" [{progress(ran, total, time.monotonic() - start)}]"
            )
            summary = summarise(rows)
            result = {**settings, "rows": rows, "summary": summary}
            (run.out / "suite.json").write_text(json.dumps(result, indent=2, default=str))
            (run.out / "suite.md").write_text(table(rows, summary) + "\n")
    return result
