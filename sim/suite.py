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
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remdr.sim.arms import paired_interval
from remdr.sim.partition import PartitionSpec
from remdr.sim.simulation import Simulation, run_simulation

from remdr.config import ExperimentConfig
from remdr.data.synthetic import SyntheticSpec

R2_GOOD, R2_FLOOR = 0.8, 0.7  # where centralized reaches R2_GOOD, federated must reach R2_FLOOR


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


def _num(value: Any) -> float:
    """A number of a report; report.json writes NaN (a diverged run) as null."""
    return math.nan if value is None else float(value)


def _federated(report: dict) -> dict:
    fed = report["results"]["federated"]
    best = report["federation"].get("best") or {}
    val = _num(best.get("val-mse"))
    return {
        "val_mse": val,  # the best round's, as the coordinator chose it (before the refit)
        "final_val_mse": _final_val(best.get("head-refit"), val),
        **_tested(fed),
        **{
            f"{k}_mse": _num(fed[k]["mse"])
            for k in ("test_oct_only", "test_fundus_only")
            if k in fed
        },
    }


def _tested(arm: dict) -> dict:
    """The test numbers and wall time every arm of a row has."""
    return {
        "test_mse": _num(arm["test"]["mse"]),
        "test_r2": _num(arm["test"]["r2"]),
        "test_mae_severe": _num(arm["test"].get("mae_severe")),
        "wall_seconds": _num(arm["wall_seconds"]),
    }


def _final_val(refit: dict | None, round_val: float) -> float:
    """The final model's validation MSE (after `head-refit`); the round's where there was no
    refit; NaN where the refit could not score it (best.json writes NaN as null)."""
    if not refit:
        return round_val
    return _num(refit.get("val-mse"))


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


def row_of(report: dict, case: str, seed: int) -> dict:
    """A suite row from one case's `report.json`: what `run_case` returns and what
    `remdr-sim suite-compare` reads back from a suite's folders."""
    central = report["results"]["centralized"]
    reference = report["results"].get("reference")
    row: dict[str, Any] = {
        "case": case,
        "seed": seed,
        "method": report["config"]["train"]["method"],
        "test_var": report["results"]["federated"]["test"]["md_var"],
        "federated": _federated(report),
        "centralized": {
            "val_mse": _num(central["best_val_mse"]),
            "final_val_mse": _num(central.get("final_val_mse")),  # older caches lack it
            **_tested(central),
        },
        "sites": {n: s["eyes"] for n, s in report["partition"]["sites"].items()},
    }
    if reference:
        ref_val = _num(reference["val_mse"])
        row["reference"] = {
            "method": reference["method"],
            "val_mse": ref_val,
            "final_val_mse": _final_val(reference.get("head_refit"), ref_val),
            **_tested(reference),
        }
    f, c = row["federated"], row["centralized"]
    row["val_ratio"] = ratio(f["val_mse"], c["val_mse"])
    row["final_val_ratio"] = ratio(f["final_val_mse"], c["final_val_mse"])
    row["test_ratio"] = ratio(f["test_mse"], c["test_mse"])
    results = report["results"]
    md = report.get("test_md", [])
    row["test_ratio_interval"] = list(paired_interval(md, results["federated"], central)[1:])
    if reference:
        ref_interval = paired_interval(md, results["federated"], reference)[1:]
        row["reference"]["fed_ratio_interval"] = list(ref_interval)
    return row


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


def summarise(rows: list[dict]) -> dict:
    """Median and worst ratios (validation: what defaults are chosen on; test: reported), and
    the cases where centralized training is good but the federation is not."""
    worst_test = max(rows, key=lambda r: _ordered(r["test_ratio"]))
    out = {
        "cases": len(rows),
        **_median_worst("val_ratio", [r["val_ratio"] for r in rows]),
        **_median_worst("final_val_ratio", [_final_ratio(r) for r in rows if _in_final_ratio(r)]),
        **_median_worst("test_ratio", [r["test_ratio"] for r in rows]),
        "test_ratio_worst_interval": worst_test.get("test_ratio_interval", [math.nan, math.nan]),
        # runs a ratio could not be taken for (a diverged federation's NaN): never left out silently
        "unscored": [
            f"{r['case']}-s{r['seed']}"
            for r in rows
            if not (_scored(r) and math.isfinite(r["val_ratio"]) and math.isfinite(r["test_ratio"]))
        ],
        # the runs whose interval lies wholly above 1: the federation worse beyond the test noise
        "test_ratio_above_1": [
            f"{r['case']}-s{r['seed']}"
            for r in rows
            if r.get("test_ratio_interval", [math.nan])[0] > 1
        ],
        "r2_failures": [
            f"{r['case']}-s{r['seed']}"
            for r in rows
            if r["centralized"]["test_r2"] >= R2_GOOD and r["federated"]["test_r2"] < R2_FLOOR
        ],
    }
    refs = [r for r in rows if "reference" in r]
    if refs:
        out["reference"] = refs[0]["reference"]["method"]
        # medians over the runs where both arms scored: a diverged arm's NaN would make them
        # depend on the order of the runs
        for key, name in (("val_mse", "val"), ("test_mse", "test"), ("final_val_mse", "final_val")):
            pairs = [(r["federated"].get(key, math.nan), r["reference"].get(key, math.nan))
                     for r in refs]  # fmt: skip
            pairs = [pair for pair in pairs if all(math.isfinite(x) for x in pair)]
            for i, arm in enumerate(("federated", "reference")):
                values = [pair[i] for pair in pairs]
                out[f"{arm}_{name}_median"] = statistics.median(values) if values else math.nan
        intervals = [r["reference"].get("fed_ratio_interval", [math.nan] * 2) for r in refs]
        out["reference_beaten"] = sum(high < 1 for _, high in intervals)  # nan compares False
        out["reference_beats"] = sum(low > 1 for low, _ in intervals)
        out["reference_runs"] = len(refs)
    return out


def _ordered(x: float) -> float:
    """A ratio for ordering runs worst-first: an unscored run (NaN) is the worst."""
    return math.inf if math.isnan(x) else x


def _scored(row: dict) -> bool:
    """Whether the federation's own numbers are all there (a diverged run's are NaN)."""
    f = row["federated"]
    return all(math.isfinite(f[k]) for k in ("val_mse", "final_val_mse", "test_mse"))


def _in_final_ratio(row: dict) -> bool:
    """A final-model ratio exists, or the federation's own number is missing: a centralized
    arm cached by an older remdr kept no final validation MSE, and its run is left out."""
    return math.isfinite(row.get("final_val_ratio", math.nan)) or not _scored(row)


def _final_ratio(row: dict) -> float:
    return row["final_val_ratio"] if _scored(row) else math.nan


def _median_worst(name: str, values: list[float]) -> dict[str, float]:
    """The median of the scored runs and the worst over all: an unscored run (a diverged
    federation, NaN) makes the worst NaN instead of dropping out of it (`max` over a list with
    a NaN answered by the order of the runs)."""
    finite = [x for x in values if math.isfinite(x)]
    worst = max(finite) if finite and len(finite) == len(values) else math.nan
    return {
        f"{name}_median": statistics.median(finite) if finite else math.nan,
        f"{name}_worst": worst,
    }


def _interval(bounds) -> str:
    low, high = bounds if bounds else (math.nan, math.nan)
    return f"{low:.2f}–{high:.2f}" if math.isfinite(low) and math.isfinite(high) else "–"


def table(rows: list[dict], summary: dict) -> str:
    """The suite as a markdown table, then its summary lines."""
    ref = summary.get("reference")
    head = (
        "| case | seed | fed val | cen val | val ratio | fed final val | cen final val "
        "| final val ratio | fed test | fed R² | cen test | cen R² | test ratio | fed s | cen s |"
        + (f" {ref} test | {ref} R² |" if ref else "")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f, c = r["federated"], r["centralized"]
        cells = [
            r["case"], str(r["seed"]), f"{f['val_mse']:.2f}", f"{c['val_mse']:.2f}",
            f"{r['val_ratio']:.2f}", f"{f['final_val_mse']:.2f}", f"{c['final_val_mse']:.2f}",
            f"{r['final_val_ratio']:.2f}", f"{f['test_mse']:.2f}", f"{f['test_r2']:.2f}",
            f"{c['test_mse']:.2f}", f"{c['test_r2']:.2f}",
            f"{r['test_ratio']:.2f} ({_interval(r.get('test_ratio_interval'))})",
            f"{f['wall_seconds']:.0f}", f"{c['wall_seconds']:.0f}",
        ]  # fmt: skip
        if ref:
            cells += [f"{r['reference']['test_mse']:.2f}", f"{r['reference']['test_r2']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    s = summary
    lines += [
        "",
        f"validation ratio federated/centralized: median {s['val_ratio_median']:.2f}, "
        f"worst {s['val_ratio_worst']:.2f} over {s['cases']} runs (the best round and epoch); "
        f"final models: median {s['final_val_ratio_median']:.2f}, "
        f"worst {s['final_val_ratio_worst']:.2f}",
        f"test ratio: median {s['test_ratio_median']:.2f}, worst {s['test_ratio_worst']:.2f}"
        f" (95% interval {_interval(s['test_ratio_worst_interval'])}, resampling the test eyes); "
        f"above 1 beyond that noise: {', '.join(s['test_ratio_above_1']) or 'none'}",
        "federated R² below "
        f"{R2_FLOOR} where centralized reaches {R2_GOOD}: {', '.join(s['r2_failures']) or 'none'}",
    ]
    if s.get("unscored"):
        lines.append(
            "unscored (a NaN number, e.g. a diverged federation; medians leave them out, the "
            f"worst is nan): {', '.join(s['unscored'])}"
        )
    if ref:
        lines.append(
            f"median validation MSE: federated {s['federated_val_median']:.2f}, federated "
            f"{ref} {s['reference_val_median']:.2f} (best rounds; final models "
            f"{s.get('federated_final_val_median', math.nan):.2f} vs "
            f"{s.get('reference_final_val_median', math.nan):.2f}); median test MSE "
            f"{s['federated_test_median']:.2f} vs {s['reference_test_median']:.2f}; better than "
            f"{ref} beyond the test noise (the 95% interval of their test ratio below 1) on "
            f"{s['reference_beaten']} of {s['reference_runs']} runs, worse on {s['reference_beats']}"
        )
    return "\n".join(lines)


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


def run_suite(run: SuiteRun, say=print) -> dict:
    """Every case at every seed; writes `suite.json` and `suite.md` in `run.out` after each
    case, so an interrupted suite keeps what it measured, beside the runs an earlier call with
    the same settings left there."""
    run.out.mkdir(parents=True, exist_ok=True)
    settings = _settings(run)
    rows: list[dict] = _earlier_rows(run, settings, say)
    for case in run.cases:
        for seed in run.seeds:
            row = run_case(run, case, seed, say)
            rows.append(row)
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
            )
            summary = summarise(rows)
            result = {**settings, "rows": rows, "summary": summary}
            (run.out / "suite.json").write_text(json.dumps(result, indent=2, default=str))
            (run.out / "suite.md").write_text(table(rows, summary) + "\n")
    return result
