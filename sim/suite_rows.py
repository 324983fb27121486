"""A suite run read back: each case's `report.json` as one row (what `remdr-sim suite` tables
and `remdr-sim suite-compare` pairs), the median and worst ratios over rows, and the table.

A diverged run's numbers are NaN (report.json writes them as null): it is listed as unscored,
the medians leave it out and the worst ratio reads nan, whatever the order of the runs.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from remdr.sim.arms import paired_interval

R2_GOOD, R2_FLOOR = 0.8, 0.7  # where centralized reaches R2_GOOD, federated must reach R2_FLOOR


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
        **_median_worst("final_val_ratio", _final_ratios(rows)),
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


def _final_ratios(rows: list[dict]) -> list[float]:
    """The final models' ratios: NaN for an unscored federation; a run whose centralized arm
    (cached by an older remdr) kept no final validation MSE is left out."""
    return [
        r["final_val_ratio"] if _scored(r) else math.nan
        for r in rows
        if not _scored(r) or math.isfinite(r.get("final_val_ratio", math.nan))
    ]


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
