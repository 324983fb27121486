"""remdr-sim suite-compare: a candidate setting against a baseline, case-seed by case-seed.

    remdr-sim suite-compare --base runs/base-s0,runs/base-s1 --candidate runs/new-s0,runs/new-s1

Reads the runs of earlier `remdr-sim suite` calls back from their folders (each case's
`<case>-s<seed>/report.json`, so suites run in pieces, or into one folder with different
`--cases`, are all found), pairs the case-seeds both sides ran, and prints, for each, the
validation MSE of the model each federation ends with, of its best round, and its test ratio
to pooled training; then the rule the project chooses defaults by: the candidate wins where
its final-model validation MSE is lower on the median case-seed and its worst ratio to pooled
training is no higher. Test numbers are shown, never chosen on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from pathlib import Path

from remdr.sim.suite import row_of

from remdr.cli.common import Parser
from remdr.errors import ConfigError, Problems

SAME = 0.01  # a final-model validation change within 1% counts as neither better nor worse
RUN_DIR = re.compile(r"^(?P<case>.+)-s(?P<seed>\d+)$")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="remdr-sim suite-compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--base", required=True, help="comma-separated suite folders: the baseline")
    ap.add_argument(
        "--candidate", required=True, help="comma-separated suite folders: the setting tried"
    )
    return ap


def read_runs(folders: list[Path], say=print) -> dict[tuple[str, int], dict]:
    """(case, seed) -> its suite row, from every `<case>-s<seed>/report.json` under `folders`;
    a report that cannot be read is skipped and counted, and a case-seed found twice is an
    error (which of the two would be compared is not for this command to guess)."""
    runs: dict[tuple[str, int], dict] = {}
    where: dict[tuple[str, int], Path] = {}
    skipped: list[str] = []
    for folder in folders:
        for report in sorted(folder.glob("*-s*/report.json")):
            m = RUN_DIR.match(report.parent.name)
            if not m:
                continue
            key = (m["case"], int(m["seed"]))
            if key in where:
                raise ConfigError(
                    f"{key[0]} seed {key[1]} is in {where[key]} and {report.parent}",
                    "one side of a comparison must have each case-seed once",
                    "name only one of those folders",
                )
            where[key] = report.parent
            try:
                runs[key] = row_of(json.loads(report.read_text()), *key)
            except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as err:
                skipped.append(f"{report} ({type(err).__name__})")
    if skipped:
        say(f"skipped {len(skipped)} unreadable run(s): " + "; ".join(skipped))
    return runs


def compare(base: dict, candidate: dict) -> dict:
    """The paired case-seeds and the numbers the default is chosen on."""
    keys = sorted(set(base) & set(candidate), key=lambda k: (k[1], k[0]))
    pairs = [(k, base[k], candidate[k]) for k in keys]
    change = [
        c["federated"]["final_val_mse"] / b["federated"]["final_val_mse"] for _, b, c in pairs
    ]
    finite = [x for x in change if math.isfinite(x)]

    def worst(side: int, key: str) -> float:
        values = [p[side][key] for p in pairs if math.isfinite(p[side][key])]
        return max(values) if values else math.nan

    def median(side: int, key: str) -> float:
        values = [p[side][key] for p in pairs if math.isfinite(p[side][key])]
        return statistics.median(values) if values else math.nan

    out = {
        "pairs": pairs,
        "change": change,
        "better": sum(x < 1 - SAME for x in finite),
        "worse": sum(x > 1 + SAME for x in finite),
        "change_median": statistics.median(finite) if finite else math.nan,
        "only_base": sorted(set(base) - set(candidate)),
        "only_candidate": sorted(set(candidate) - set(base)),
    }
    for name, side in (("base", 1), ("candidate", 2)):
        out[f"{name}_final_worst"] = worst(side, "final_val_ratio")
        out[f"{name}_final_median"] = median(side, "final_val_ratio")
        out[f"{name}_test_worst"] = worst(side, "test_ratio")
        out[f"{name}_test_median"] = median(side, "test_ratio")
    out["wins"] = bool(
        finite
        and out["change_median"] < 1
        and out["candidate_final_worst"] <= out["base_final_worst"]
    )
    return out


def report(result: dict) -> str:
    lines = [
        "| case | seed | final model's validation MSE: base → candidate | best round's | "
        "test ratio to pooled |",
        "|---|---|---|---|---|",
    ]
    for ((case, seed), b, c), x in zip(result["pairs"], result["change"], strict=True):
        fb, fc = b["federated"], c["federated"]
        lines.append(
            f"| {case} | {seed} | {fb['final_val_mse']:.2f} → {fc['final_val_mse']:.2f} "
            f"({x:.2f}x) | {fb['val_mse']:.2f} → {fc['val_mse']:.2f} | "
            f"{b['test_ratio']:.2f} → {c['test_ratio']:.2f} |"
        )
    r, n = result, len(result["pairs"])
    lines += [
        "",
        f"final model's validation MSE, candidate / base over {n} case-seeds: median "
        f"{r['change_median']:.2f}x; better on {r['better']}, worse on {r['worse']} "
        f"(within {SAME:.0%}: neither)",
        f"final-model validation ratio to pooled training: median {r['base_final_median']:.2f} → "
        f"{r['candidate_final_median']:.2f}, worst {r['base_final_worst']:.2f} → "
        f"{r['candidate_final_worst']:.2f}",
        f"test ratio to pooled training (shown, not chosen on): median {r['base_test_median']:.2f}"
        f" → {r['candidate_test_median']:.2f}, worst {r['base_test_worst']:.2f} → "
        f"{r['candidate_test_worst']:.2f}",
        "on validation the candidate "
        + (
            "wins (a lower median and a worst ratio no higher)"
            if r["wins"]
            else "does not win (it needs a lower median and a worst ratio no higher)"
        ),
    ]
    for side in ("base", "candidate"):
        if r[f"only_{side}"]:
            names = ", ".join(f"{c}-s{s}" for c, s in r[f"only_{side}"])
            lines.append(f"only in {side} (not compared): {names}")
    return "\n".join(lines)


def suite_compare(args: argparse.Namespace, say=print) -> int:
    p = Problems()
    sides = {}
    for flag, value in (("--base", args.base), ("--candidate", args.candidate)):
        folders = [Path(f) for f in value.split(",") if f.strip()]
        missing = [str(f) for f in folders if not f.is_dir()]
        if not folders or missing:
            p.add(f"{flag} {value}", "names no suite folder" if not folders else
                  f"not a folder: {', '.join(missing)}", "a folder `remdr-sim suite --out` wrote")  # fmt: skip
        sides[flag] = folders
    p.raise_if_any()
    base = read_runs(sides["--base"], say)
    candidate = read_runs(sides["--candidate"], say)
    result = compare(base, candidate)
    if not result["pairs"]:
        raise ConfigError(
            "no case-seed is in both sides",
            f"base has {len(base)} run(s), candidate {len(candidate)}",
            "compare suites run on the same cases and seeds",
        )
    say(report(result))
    return 0
