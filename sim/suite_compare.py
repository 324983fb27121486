"""remdr-sim suite-compare: a candidate setting against a baseline, case-seed by case-seed.

    remdr-sim suite-compare --base runs/base-s0,runs/base-s1 --candidate runs/new-s0,runs/new-s1
    remdr-sim suite-compare --reference runs/ref-s0    # the method against its reference arm

Reads the runs of earlier `remdr-sim suite` calls back from their folders (each case's
`<case>-s<seed>/report.json`, so suites run in pieces are all found), checks that each side ran
one setting and names the keys where the candidate's differs, pairs the case-seeds both sides
ran on the same test eyes, and prints, for each, the validation MSE of the model each federation
ends with, of its best round, and its test ratio to pooled training; then the rule the project
chooses defaults by. Test numbers are shown, never chosen on. Exit code 0: the candidate wins
on validation; 1: it does not; 2: the folders cannot be compared.

With --reference, the runs of suites run with `--reference METHOD` are compared within
themselves: the reference arm (e.g. federated concat) is the base, the suite's method the
candidate, each run against the reference federated on the same partition and settings.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remdr.sim.suite_rows import ratio, row_of

from remdr.cli.common import Parser
from remdr.errors import ConfigError, Problems

SAME = 0.01  # a final-model validation change within 1% counts as neither better nor worse
RUN_DIR = re.compile(r"^(?P<case>.+)-s(?P<seed>\d+)$")
# run-config keys that differ between the case-seeds of one suite by design
PER_RUN_KEYS = {"seed", "out-dir", "sim-data-root", "min-nodes"}


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog="remdr-sim suite-compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--base", help="comma-separated suite folders: the baseline")
    ap.add_argument("--candidate", help="comma-separated suite folders: the setting tried")
    ap.add_argument(
        "--reference",
        help="comma-separated folders of suites run with --reference: the method against its "
        "reference arm, run by run (instead of --base and --candidate)",
    )
    return ap


@dataclass
class Side:
    """One side's runs: (case, seed) -> suite row, the setting they share, what was skipped."""

    rows: dict[tuple[str, int], dict] = field(default_factory=dict)
    setting: dict[str, Any] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def read_side(flag: str, folders: list[Path]) -> Side:
    """Every `<case>-s<seed>/report.json` under `folders`. A report that cannot be read is
    skipped and counted; a case-seed found twice, or runs of two settings, are refused (which
    of them would be compared is not for this command to guess)."""
    side, where = Side(), {}
    for folder in folders:
        for path in sorted(folder.glob("*-s*/report.json")):
            m = RUN_DIR.match(path.parent.name)
            if not m:
                continue
            key = (m["case"], int(m["seed"]))
            if key in where:
                raise ConfigError(
                    f"{flag}: {key[0]} seed {key[1]} is in {where[key]} and {path.parent}",
                    "one side of a comparison must have each case-seed once",
                    "name only one of those folders",
                )
            where[key] = path.parent
            try:
                report = json.loads(path.read_text())
                side.rows[key] = row_of(report, *key)
                setting = {k: v for k, v in report["run_config"].items() if k not in PER_RUN_KEYS}
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                side.skipped.append(f"{path} ({type(err).__name__}: {err})")
                continue
            if side.setting and setting != side.setting:
                keys = ", ".join(differing(side.setting, setting)) or "?"
                raise ConfigError(
                    f"{flag}: {path.parent} was run with other settings than the runs before it",
                    f"they differ in {keys}",
                    "compare one setting per side: name the folders of one suite",
                )
            side.setting = setting
    return side


def reference_rows(rows: dict[tuple[str, int], dict]) -> tuple[dict, list[str]]:
    """Each run's reference arm as a row of its own (its final validation MSE and its ratios to
    the same pooled arm), so `compare` weighs the method against it; and the runs without one."""
    out, missing = {}, []
    for key, row in rows.items():
        ref = row.get("reference")
        if ref is None:  # a suite without --reference
            missing.append(f"{key[0]}-s{key[1]}")
            continue
        # a diverged reference says nothing of the method
        if not math.isfinite(ref["final_val_mse"]):
            missing.append(f"{key[0]}-s{key[1]} (its reference unscored)")
            continue
        central = row["centralized"]
        out[key] = {
            **row,
            "method": ref["method"],
            "federated": {"val_mse": ref["val_mse"], "final_val_mse": ref["final_val_mse"]},
            "val_ratio": ratio(ref["val_mse"], central["val_mse"]),
            "final_val_ratio": ratio(ref["final_val_mse"], central["final_val_mse"]),
            "test_ratio": ratio(ref["test_mse"], central["test_mse"]),
        }
    return out, missing


def differing(a: dict, b: dict) -> list[str]:
    """The keys whose values differ (a key one side lacks took its default there)."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


def compare(base: dict, candidate: dict) -> dict:
    """The paired case-seeds and the numbers the default is chosen on. A pair the candidate's
    run could not score (a NaN: a diverged run) counts as worse and blocks a win."""
    keys = sorted(set(base) & set(candidate), key=lambda k: (k[1], k[0]))
    pairs = [(k, base[k], candidate[k]) for k in keys]
    change = [
        c["federated"]["final_val_mse"] / b["federated"]["final_val_mse"] for _, b, c in pairs
    ]
    unscored = sum(not math.isfinite(x) for x in change)
    finite = [x for x in change if math.isfinite(x)]

    def over(side: int, key: str, how) -> float:
        values = [p[side][key] for p in pairs]
        return how(values) if values and all(math.isfinite(v) for v in values) else math.nan

    out = {
        "pairs": pairs,
        "change": change,
        "better": sum(x < 1 - SAME for x in finite),
        "worse": sum(x > 1 + SAME for x in finite) + unscored,
        "unscored": unscored,
        "change_median": statistics.median(finite) if finite else math.nan,
        "only_base": sorted(set(base) - set(candidate)),
        "only_candidate": sorted(set(candidate) - set(base)),
    }
    for name, side in (("base", 1), ("candidate", 2)):
        out[f"{name}_final_worst"] = over(side, "final_val_ratio", max)
        out[f"{name}_final_median"] = over(side, "final_val_ratio", statistics.median)
        out[f"{name}_test_worst"] = over(side, "test_ratio", max)
        out[f"{name}_test_median"] = over(side, "test_ratio", statistics.median)
    out["wins"] = bool(
        not unscored
        and out["change_median"] < 1 - SAME
        and out["candidate_final_worst"] <= out["base_final_worst"]
    )
    return out


def comparison_text(result: dict) -> str:
    """The per-case-seed table and the verdict, as `suite-compare` prints it."""
    lines = [
        "| case | seed | final model's validation MSE: base → candidate | best round's | "
        "test ratio to pooled |",
        "|---|---|---|---|---|",
    ]
    for ((case, seed), b, c), x in zip(result["pairs"], result["change"], strict=True):
        fb, fc = b["federated"], c["federated"]
        lines.append(
            f"| {case} | {seed} | {fb['final_val_mse']:.2f} → {fc['final_val_mse']:.2f} "
            f"({x:.3f}x) | {fb['val_mse']:.2f} → {fc['val_mse']:.2f} | "
            f"{b['test_ratio']:.2f} → {c['test_ratio']:.2f} |"
        )
    r, n = result, len(result["pairs"])
    lines += [
        "",
        f"final model's validation MSE, candidate / base over {n} case-seeds: median "
        f"{r['change_median']:.3f}x; better on {r['better']}, worse on {r['worse']} "
        f"(within {SAME:.0%}: neither"
        + (f"; {r['unscored']} unscored count as worse)" if r["unscored"] else ")"),  # fmt: skip
        f"final-model validation ratio to pooled training: median {r['base_final_median']:.2f} → "
        f"{r['candidate_final_median']:.2f}, worst {r['base_final_worst']:.2f} → "
        f"{r['candidate_final_worst']:.2f}",
        f"test ratio to pooled training (shown, not chosen on): median {r['base_test_median']:.2f}"
        f" → {r['candidate_test_median']:.2f}, worst {r['base_test_worst']:.2f} → "
        f"{r['candidate_test_worst']:.2f}",
        "on validation the candidate "
        + ("wins" if r["wins"] else "does not win")
        + f" (it needs a median below {1 - SAME:.2f}x, no unscored run and a worst ratio to "
        "pooled training no higher)",
    ]
    for side in ("base", "candidate"):
        if r[f"only_{side}"]:
            names = ", ".join(f"{c}-s{s}" for c, s in r[f"only_{side}"])
            lines.append(f"only in {side} (not compared): {names}")
    return "\n".join(lines)


def _folders(flag: str, value: str, p: Problems) -> list[Path]:
    folders = list(dict.fromkeys(Path(f.strip()) for f in value.split(",") if f.strip()))
    missing = [str(f) for f in folders if not f.is_dir()]
    if not folders or missing:
        why = f"not a folder: {', '.join(missing)}" if missing else "names no suite folder"
        p.add(f"{flag} {value}", why, "a folder `remdr-sim suite --out` wrote")
    return folders


def _against_reference(value: str, say) -> int:
    p = Problems()
    folders = _folders("--reference", value, p)
    p.raise_if_any()
    side = read_side("--reference", folders)
    if side.skipped:
        say(f"skipped {len(side.skipped)} unreadable run(s): " + "; ".join(side.skipped))
    base, missing = reference_rows(side.rows)
    if not base:
        raise ConfigError(
            f"--reference {value}: no run has a reference arm",
            "the suites were run without --reference (or by an older remdr)",
            "run `remdr-sim suite --reference concat` and name its folder",
        )
    candidate = {key: side.rows[key] for key in base}
    method = next(iter(candidate.values()))["method"]
    say(
        f"the method {method} (candidate) against its reference "
        f"{next(iter(base.values()))['method']} (base), federated on the same partitions"
    )
    if missing:
        say(f"not compared, no scored reference arm: {', '.join(sorted(missing))}")
    return _verdict(compare(base, candidate), "a run" if side.skipped else "", say)


def _verdict(result: dict, unread: str, say) -> int:
    """Print the comparison; the exit code: 0 the candidate wins, 1 it does not, or `unread`
    (which runs could not be read) is not empty and no win is declared."""
    say(comparison_text(result))
    if unread:
        say(f"{unread} could not be read: no win is declared")
        return 1
    return 0 if result["wins"] else 1


def suite_compare(args: argparse.Namespace, say=print) -> int:
    p = Problems()
    if args.reference is not None:
        if args.base or args.candidate:
            p.add("--reference with --base or --candidate", "it compares within one set of runs",
                  "give --reference alone, or --base and --candidate")  # fmt: skip
            p.raise_if_any()
        return _against_reference(args.reference, say)
    if not (args.base and args.candidate):
        p.add("--base and --candidate", "both are needed (or --reference alone)",
              "name the baseline's and the candidate's suite folders")  # fmt: skip
        p.raise_if_any()
    folders = {flag: _folders(flag, value, p) for flag, value in
               (("--base", args.base), ("--candidate", args.candidate))}  # fmt: skip
    p.raise_if_any()
    base = read_side("--base", folders["--base"])
    candidate = read_side("--candidate", folders["--candidate"])
    for name, side in (("base", base), ("candidate", candidate)):
        if side.skipped:
            say(
                f"{name}: skipped {len(side.skipped)} unreadable run(s): " + "; ".join(side.skipped)
            )
    other_eyes = [
        f"{c}-s{s}"
        for (c, s) in set(base.rows) & set(candidate.rows)
        if not math.isclose(base.rows[c, s]["test_var"], candidate.rows[c, s]["test_var"])
    ]
    if other_eyes:
        raise ConfigError(
            f"{', '.join(sorted(other_eyes))}: the two sides tested other eyes",
            "a comparison needs each case-seed on the same data (--data, --synthetic-n)",
            "compare suites run on the same data",
        )
    result = compare(base.rows, candidate.rows)
    if not result["pairs"]:
        raise ConfigError(
            "no case-seed is in both sides",
            f"base has {len(base.rows)} run(s), candidate {len(candidate.rows)}",
            "compare suites run on the same cases and seeds",
        )
    changed = differing(base.setting, candidate.setting)
    say("the candidate's setting differs in: " + (", ".join(
        f"{k} = {candidate.setting.get(k, '(default)')} (base {base.setting.get(k, '(default)')})"
        for k in changed) or "nothing"))  # fmt: skip
    return _verdict(result, "a candidate run" if candidate.skipped else "", say)
