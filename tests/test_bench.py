"""remdr-bench on tiny data: every output is written and the table marks the best."""

from __future__ import annotations

import csv
import math
import re

from conftest import TINY_CLI_FLAGS

from remdr.bench import TABLE_COLUMNS, markdown_table
from remdr.cli import bench

TINY = TINY_CLI_FLAGS


def test_methods_bench_writes_results(tiny_data, tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "methods",
        "--data",
        str(tiny_data),
        "--methods",
        "concat,remdr",
        "--seeds",
        "2",
        "--out",
        str(out),
        *TINY,
    ]
    assert bench.main(args) == 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["method"], r["seed"]) for r in rows} == {
        ("concat", "0"),
        ("concat", "1"),
        ("remdr", "0"),
        ("remdr", "1"),
    }
    table = (out / "results.md").read_text()
    assert table.count("\n| concat |") == 1 and "±" in table and "**" in table
    for name in ("pred_vs_true_concat.png", "pred_vs_true_remdr.png", "mae_per_bin.png"):
        assert (out / name).is_file()
    assert "results" in capsys.readouterr().out


def test_markdown_marks_lowest_error_and_highest_r2():
    cols = [key for key, _, _ in TABLE_COLUMNS]
    a = {k: 1.0 for k in cols} | {f"{k}_std": 0.0 for k in cols}
    a |= {"train_seconds": 1.0, "best_epoch": 3.0}
    b = dict(a) | {"mse": 2.0, "r2": 2.0}
    table = markdown_table({"a": a, "b": b})
    line_a = next(ln for ln in table.splitlines() if ln.startswith("| a |"))
    line_b = next(ln for ln in table.splitlines() if ln.startswith("| b |"))
    at = {key: i + 2 for i, key in enumerate(cols)}  # cell index after the leading "|" and name
    assert line_a.split("|")[at["mse"]].strip() == "**1.00 ± 0.00**"  # lower MSE wins
    assert line_b.split("|")[at["r2"]].strip() == "**2.00 ± 0.00**"  # higher R² wins


def test_speed_bench_reports_ratios(tiny_data, capsys):
    args = [
        "speed",
        "--data",
        str(tiny_data),
        "--methods",
        "concat,sam",
        "--steps",
        "1",
        "--rounds",
        "1",
        *TINY,
    ]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    sam_line = next(ln for ln in out.splitlines() if ln.strip().startswith("sam "))
    ratio = float(re.search(r"step ratio vs concat: ([0-9.]+)", sam_line).group(1))
    # measured, not assumed: a positive finite number (SAM's two passes make it ~2 on a quiet CPU)
    assert math.isfinite(ratio) and ratio > 0


def test_methods_bench_learning_curves(tiny_data, tmp_path):
    out = tmp_path / "curves"
    args = ["methods", "--data", str(tiny_data), "--methods", "concat,oct", "--seeds", "1",
            "--curves", "--out", str(out), *TINY, "--set", "epochs=3"]  # fmt: skip
    assert bench.main(args) == 0
    rows = list(csv.DictReader((out / "curves.csv").open()))
    assert [(r["method"], r["epoch"]) for r in rows] == [
        (m, str(e)) for m in ("concat", "oct") for e in (1, 2, 3)
    ]
    assert all(math.isfinite(float(r["val_mse"])) and float(r["test_mse"]) > 0 for r in rows)
    table = (out / "results.md").read_text()
    assert "Learning curves" in table and "\n| oct | " in table.split("Learning curves")[1]
    assert (out / "learning_curves.png").is_file()
