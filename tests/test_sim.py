"""Partitions and a short remdr-sim run with Flower's simulation runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from remdr.sim import cli as sim_cli
from remdr.sim import suite_cli
from remdr.sim.partition import PartitionSpec, partition
from remdr.sim.runner import SimResources, check_trained, run_federation, stream_printer
from remdr.sim.suite import case_simulation

from remdr.data import load_dataset
from remdr.data.synthetic import SyntheticSpec, generate
from remdr.errors import RemdrError
from remdr.metrics import BINS
from remdr.ops.processes import matching_processes


@pytest.fixture(scope="module")
def sim_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("simdata")
    generate(out, SyntheticSpec(n=240, size=32, depth=6, n_sites=3, seed=5))
    return out


def _ids(recs) -> set[str]:
    return {r.eye_id for r in recs}


def test_partitions_are_disjoint_complete_and_keep_test_apart(sim_data, tmp_path):
    ds = load_dataset(sim_data)
    part = partition(ds, PartitionSpec(sites=4, alpha=1.0, seed=1), tmp_path / "p")
    site_sets = [_ids(r) for r in part.sites.values()]
    assert sum(len(s) for s in site_sets) == len(set().union(*site_sets))  # disjoint
    assert set().union(*site_sets) | _ids(part.test) == _ids(ds.records)  # complete
    assert not (set().union(*site_sets) & _ids(part.test))
    test_patients = {r.patient_id for r in part.test}
    for recs in part.sites.values():
        assert not (
            {r.patient_id for r in recs} & test_patients
        )  # the test set never reaches a site
    for name, recs in part.sites.items():  # each site folder is a loadable hospital folder
        assert _ids(load_dataset(part.site_dir(name)).records) == _ids(recs)
    summary = json.loads((tmp_path / "p" / "partition.json").read_text())
    assert set(summary["sites"]) == set(part.sites) and summary["test"]["eyes"] == len(part.test)


def test_same_seed_same_split(sim_data, tmp_path):
    ds = load_dataset(sim_data)
    a = partition(ds, PartitionSpec(sites=3, seed=7), tmp_path / "a")
    b = partition(ds, PartitionSpec(sites=3, seed=7), tmp_path / "b")
    assert {k: _ids(v) for k, v in a.sites.items()} == {k: _ids(v) for k, v in b.sites.items()}


def _skew(part) -> float:
    """Mean total-variation distance between each site's severity mix and the pooled mix."""
    counts = np.array(
        [
            [sum(1 for r in recs if r.md is not None and b == _bin(r.md)) for b in range(len(BINS))]
            for recs in part.sites.values()
        ],
        float,
    )
    pooled = counts.sum(0) / counts.sum()
    mixes = counts / counts.sum(1, keepdims=True)
    return float(np.mean(0.5 * np.abs(mixes - pooled).sum(1)))


def _bin(md: float) -> int:
    from remdr.metrics import severity_bin

    return severity_bin(md)


def test_alpha_controls_label_skew(sim_data, tmp_path):
    ds = load_dataset(sim_data)
    skews = {}
    for alpha in (0.1, 100.0):
        runs = [
            _skew(
                partition(
                    ds, PartitionSpec(sites=3, alpha=alpha, seed=s), tmp_path / f"{alpha}-{s}"
                )
            )
            for s in range(3)
        ]
        skews[alpha] = np.mean(runs)
    assert skews[0.1] > 2 * skews[100.0], skews


def test_screening_sites_are_one_large_normal_clinic_and_small_severe_ones(sim_data, tmp_path):
    from remdr.sim.partition import bin_counts

    ds = load_dataset(sim_data)
    for seed in range(3):
        part = partition(ds, PartitionSpec(sites=4, scheme="screening", seed=seed), tmp_path / "p")
        screening, *specialists = part.sites.values()
        assert all(len(screening) > len(s) for s in specialists)
        pooled = [r for recs in specialists for r in recs]
        normal = lambda recs: bin_counts(recs)["normal"] / len(recs)  # noqa: E731
        severe = lambda recs: bin_counts(recs)["severe"] / len(recs)  # noqa: E731
        assert normal(screening) > 2 * normal(pooled)
        assert severe(pooled) > 3 * severe(screening)
    again = partition(ds, PartitionSpec(sites=4, scheme="screening", seed=2), tmp_path / "q")
    assert {k: _ids(v) for k, v in again.sites.items()} == {
        k: _ids(v) for k, v in part.sites.items()
    }


def test_the_suite_covers_the_skews_a_study_meets_and_is_reproducible_from_a_seed():
    from remdr.sim.suite import SUITE

    assert len(SUITE) >= 8
    alphas = {c.alpha for c in SUITE if c.scheme == "dirichlet"}
    assert {1.0, 0.3, 0.1} <= alphas and {c.sites for c in SUITE} >= {4, 8}
    assert {"quantity", "screening"} <= {c.scheme for c in SUITE}
    assert any(set(c.site_modalities) - {"both"} for c in SUITE)
    assert all(c.partition(3) == c.partition(3) and c.partition(3).seed == 3 for c in SUITE)


def test_a_suite_says_how_far_it_is_and_how_long_the_rest_will_take():
    from remdr.sim.suite import progress

    assert progress(3, 16, 3 * 12.5 * 60) == "3/16, 37.5 min, ~162 min left"  # 13 x 12.5 min
    assert progress(16, 16, 200 * 60) == "16/16, 200.0 min"  # the last case: nothing left


def test_the_suite_summary_reports_the_median_and_the_worst_ratio():
    from remdr.sim.suite_rows import summarise, table

    def row(case, fed_val, cen_val, fed_r2, cen_r2, final=1.0):
        return {
            "case": case, "seed": 0, "val_ratio": fed_val / cen_val, "test_ratio": fed_val / cen_val,
            "final_val_ratio": final,  # the final models' (after the refit): a cache may lack it
            "federated": {"val_mse": fed_val, "final_val_mse": final * cen_val if final == final
                          else fed_val, "test_mse": fed_val, "test_r2": fed_r2, "wall_seconds": 1},
            "centralized": {"val_mse": cen_val, "final_val_mse": cen_val, "test_mse": cen_val,
                            "test_r2": cen_r2, "wall_seconds": 1},
        }  # fmt: skip

    rows = [
        row("a", 3.0, 3.0, 0.9, 0.9, final=1.2),
        row("b", 6.0, 4.0, 0.6, 0.85, final=1.0),
        row("c", 4.4, 4.0, 0.8, 0.8, final=float("nan")),
    ]
    rows[0]["test_ratio_interval"] = [0.9, 1.1]
    rows[1]["test_ratio_interval"] = [1.2, 1.9]  # "c" has none: its centralized arm kept no eyes
    s = summarise(rows)
    assert s["test_ratio_worst_interval"] == [1.2, 1.9] and s["test_ratio_above_1"] == ["b-s0"]
    assert s["val_ratio_median"] == pytest.approx(1.1) and s["val_ratio_worst"] == pytest.approx(
        1.5
    )
    assert s["final_val_ratio_median"] == pytest.approx(1.1)  # the unknown one left out
    assert s["final_val_ratio_worst"] == pytest.approx(1.2)
    assert s["r2_failures"] == ["b-s0"]  # centralized good (0.85), federated not (0.6)
    text = table(rows, s)
    assert "median 1.10, worst 1.50" in text and text.count("\n| ") == 3  # one row per run
    assert "final models: median 1.10, worst 1.20" in text
    assert "| 1.50 (1.20–1.90) |" in text and "| 1.10 (–) |" in text
    assert "worst 1.50 (95% interval 1.20–1.90" in text and "beyond that noise: b-s0" in text


def test_two_arms_are_paired_eye_by_eye_on_the_test_set():
    """The interval comes from each arm's prediction for every test eye, as the simulator
    reports them; an arm from an older cache (no predictions) or from other data (other eyes)
    gets none, and the printed line says so instead of pairing the wrong eyes."""
    from remdr.sim.arms import paired_interval
    from remdr.sim.report import ratio_lines

    from remdr.metrics import ratio_interval

    rng = np.random.default_rng(1)
    md = rng.normal(-5, 5, 120)
    fed, central = md + rng.normal(0, 2.2, 120), md + rng.normal(0, 2.0, 120)
    arm = {"test_pred": fed.tolist(), "test_md": md.tolist(), "test": {"mse": 4.8}}
    pooled = {"test_pred": central.tolist(), "test_md": md.tolist(), "test": {"mse": 4.0}}
    ratio, low, high = paired_interval(md.tolist(), arm, pooled)
    assert (low, high) == ratio_interval((fed - md) ** 2, (central - md) ** 2)
    assert low < ratio == pytest.approx(((fed - md) ** 2).mean() / ((central - md) ** 2).mean())
    assert ratio < high
    older = {"test": {"mse": 4.0}}
    elsewhere = {**pooled, "test_md": (md + 1).tolist()}  # a cache of another data set's eyes
    for other in (older, elsewhere):
        assert all(np.isnan(paired_interval(md.tolist(), arm, other)))
    lines = ratio_lines({"federated": arm, "centralized": pooled}, md.tolist())
    assert lines == [f"federated / centralized test MSE {ratio:.2f}x (95% interval over the "
                     f"test eyes {low:.2f}-{high:.2f})"]  # fmt: skip
    lines = ratio_lines({"federated": arm, "centralized": older}, md.tolist())
    assert lines == ["federated / centralized test MSE 1.20x (interval -)"]


def test_suite_flags_are_checked_before_any_training(tmp_path, capsys):
    out = ["--out", str(tmp_path / "suite")]
    code = sim_cli.main(["suite", "--cases", "nope", "--seeds", "x", "--reference", "remdr_dp",
                         "--rounds", "0", "--synthetic-n", "4", "--cpus-per-site", "1.5",
                         *out])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    for text in ("6 problems", "--cases nope", "--seeds x", "--reference remdr_dp", "--rounds 0",
                 "--synthetic-n 4", "--cpus-per-site 1.5"):  # fmt: skip
        assert text in err
    assert not (tmp_path / "suite").exists()
    assert sim_cli.main(["suite", "--list-cases"]) == 0
    assert "screening-5" in capsys.readouterr().out


def test_a_suite_on_a_larger_synthetic_set_sizes_every_case_with_it(tmp_path):
    """--synthetic-n reaches each case's simulation; it cannot size a dataset the user gave,
    nor shrink the synthetic set below what the 8-site cases split."""
    args = suite_cli.build_parser().parse_args(
        ["--synthetic-n", "4800", "--cases", "screening-5", "--out", str(tmp_path / "s")]
    )
    run = suite_cli.suite_of(args)
    sim = case_simulation(run, run.cases[0], seed=1)
    assert sim.synthetic_n == 4800 and sim.data == ""
    default = suite_cli.suite_of(suite_cli.build_parser().parse_args(["--out", str(tmp_path)]))
    assert case_simulation(default, default.cases[0], seed=1).synthetic_n == SyntheticSpec.n
    args = suite_cli.build_parser().parse_args(
        ["--synthetic-n", "4800", "--data", str(tmp_path), "--out", str(tmp_path / "s")]
    )
    with pytest.raises(RemdrError, match="--synthetic-n 4800"):
        suite_cli.suite_of(args)
    args = suite_cli.build_parser().parse_args(["--synthetic-n", "600", "--out", str(tmp_path)])
    with pytest.raises(RemdrError, match="--synthetic-n 600"):  # too few for 8 sites
        suite_cli.suite_of(args)


def test_predefined_sites_follow_the_site_field(sim_data, tmp_path):
    ds = load_dataset(sim_data)
    part = partition(ds, PartitionSpec(scheme="predefined", seed=0), tmp_path / "p")
    assert len(part.sites) == 3
    for recs in part.sites.values():
        assert len({r.site for r in recs}) == 1


def _flower_leftovers(markers: list[str]) -> list[str]:
    return list(matching_processes(markers).values())


def test_a_private_method_gets_the_readme_dp_recipe_unless_overridden(tmp_path, capsys):
    parse = sim_cli.build_parser().parse_args
    cfg, epochs, recipe = sim_cli.resolve_config(parse(["--method", "remdr_dp"]))
    assert (cfg.train.lr, cfg.train.schedule, epochs) == (3e-3, "constant", 4)
    assert cfg.privacy.dp_target_epsilon == 8.0 and "batch-size" in recipe
    # q = 1/ceil(patients/batch) = 0.5 at the smallest site (34 training patients of 40)
    assert sim_cli.dp_batch_size([100, 40], 0.15) == 17
    args = ["--method", "remdr_dp", "--lr", "0.01", "--batch-size", "8", "--local-epochs", "2"]
    cfg, epochs, recipe = sim_cli.resolve_config(parse([*args, "--set", "dp-noise=2"]))
    assert (cfg.train.lr, cfg.train.batch_size, epochs) == (0.01, 8, 2)
    assert cfg.privacy.dp_target_epsilon == 0.0 and cfg.privacy.dp_noise == 2.0
    assert set(recipe) == {"schedule", "optimizer"} and cfg.train.optimizer == "adamw"
    cfg, epochs, recipe = sim_cli.resolve_config(parse([]))  # a non-private method: no recipe
    assert (cfg.train.method, cfg.train.optimizer, cfg.train.lr) == ("remdr", "adamw", 0.001)
    assert (cfg.train.batch_size, epochs, recipe) == (8, 1, {})
    assert cfg.privacy.group_norm and cfg.train.schedule == "constant"  # the federated defaults
    # and the simulator says so first, before it even looks at the data
    out = ["--out", str(tmp_path / "o"), "--data", str(tmp_path / "none")]
    assert sim_cli.main(["--method", "remdr_dp", *out]) == 2
    first = capsys.readouterr().out.splitlines()[0]
    assert "DP recipe" in first and "batch-size" in first and "local-epochs 4" in first


def test_a_federation_that_aggregated_nothing_is_an_error_that_says_why(tmp_path, capsys):
    """Round records as the strategy writes them: no round that aggregated an update is an
    error naming the sites' reasons (its model is the initial one); so is a run whose every
    aggregate was refused; one aggregated round is enough."""
    failed = {"site": "site-0", "phase": "train", "reason": "ClientApp raised: boom"}
    rejected = {"site": "site-1", "phase": "train", "reason": "update rejected: norm 3e4"}
    records = [
        {"round": r, "sites": {"site-1": {"num-examples": 40}}, "errors": [failed, rejected]}
        for r in (1, 2)
    ]  # site-1 replied (its metrics are recorded) but its update was rejected
    with pytest.raises(RemdrError) as err:
        check_trained(records, tmp_path / "flower.log")
    assert "site-0 in train: ClientApp raised: boom" in str(err.value)
    assert "site-1 in train: update rejected" in str(err.value)
    assert str(err.value).count("boom") == 1  # one line per distinct reason
    for rec in records:
        rec.update(errors=[], aggregated=["site-1"], refused="non-finite values")
    with pytest.raises(RemdrError, match="the aggregate was refused: non-finite values"):
        check_trained(records, tmp_path / "flower.log")
    del records[1]["refused"]
    check_trained(records, tmp_path / "flower.log")

    show = stream_printer()
    for _ in range(3):  # every round: told once
        show("WARNING :      site site-0 failed in train: ClientApp raised: boom")
    show("INFO :      remdr round 1/2: val MSE nan () in 6.4s")
    out = capsys.readouterr()
    assert out.err.strip() == "site site-0 failed in train: ClientApp raised: boom"
    assert out.out.strip() == "round 1/2: val MSE nan () in 6.4s"


@pytest.mark.e2e
@pytest.mark.slow
def test_short_simulation_completes_and_leaves_nothing_running(sim_data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--data", str(sim_data), "--out", str(out), "--sites", "2", "--rounds", "2", "--compare-centralized",
        "--image-size", "32", "--n-bscans", "2", "--batch-size", "16", "--device", "cpu",
        "--set", "embed-dim=16", "--set", "fusion-hidden=16", "--quiet",
    ]  # fmt: skip
    assert sim_cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    fed, central = report["results"]["federated"]["test"], report["results"]["centralized"]["test"]
    for m in (fed, central):
        assert m["n"] > 0 and np.isfinite(m["mse"]) and "mae_severe" in m
    md = np.asarray(report["test_md"])  # each arm's prediction for every test eye, in one order
    for arm in ("federated", "centralized"):
        pred = np.asarray(report["results"][arm]["test_pred"], np.float64)
        assert len(pred) == len(md) == report["results"][arm]["test"]["n"]
        assert np.mean((pred - md) ** 2) == pytest.approx(report["results"][arm]["test"]["mse"])
    assert [r["round"] for r in report["federation"]["rounds"]] == [1, 2]
    refit = report["federation"]["best"]["head-refit"]  # the federated default, both sites summed
    assert refit["sites"] == ["site-0", "site-1"]
    for head in ("oct", "fundus", "fusion"):
        assert refit[head]["val-mse"] <= refit[head]["val-mse-before"]
    for name in ("report.md", "learning_curves.png", "pred_vs_true.png", "per_site.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "federated" in printed and "centralized" in printed and "report.md" in printed
    ports = [f"127.0.0.1:{p}" for p in report["local_superlink_ports"]]
    assert _flower_leftovers([*ports, str(out)]) == []
    _suite_compare_reads_back(report, tmp_path, capsys)


def _suite_compare_reads_back(report: dict, tmp_path: Path, capsys) -> None:
    """`remdr-sim suite-compare` reads a real report as the suite wrote its row; a candidate
    whose final model scores 10% lower on validation wins."""
    from remdr.sim.suite_rows import row_of

    better = json.loads(json.dumps(report))
    better["federation"]["best"]["head-refit"]["val-mse"] *= 0.9
    for side, content in (("base", report), ("cand", better)):
        (tmp_path / side / "dirichlet-a1-4-s0").mkdir(parents=True)
        (tmp_path / side / "dirichlet-a1-4-s0" / "report.json").write_text(json.dumps(content))
    refit = report["federation"]["best"]["head-refit"]
    assert row_of(report, "dirichlet-a1-4", 0)["federated"]["final_val_mse"] == pytest.approx(
        refit["val-mse"]
    )
    base, cand = str(tmp_path / "base"), str(tmp_path / "cand")
    args = ["suite-compare", "--base", base, "--candidate", cand]
    assert sim_cli.main(args) == 0
    printed = capsys.readouterr().out
    assert "| dirichlet-a1-4 | 0 |" in printed and "(0.900x)" in printed
    assert "better on 1, worse on 0" in printed and "the candidate wins" in printed
    assert "the candidate's setting differs in: nothing" in printed
    # a run of another setting on the candidate's side is refused, and the keys are named
    other = json.loads(json.dumps(better))
    other["run_config"]["lr"] = 0.5
    (tmp_path / "cand" / "screening-5-s0").mkdir()
    (tmp_path / "cand" / "screening-5-s0" / "report.json").write_text(json.dumps(other))
    assert sim_cli.main(args) == 2
    assert "they differ in lr" in capsys.readouterr().err


def _simulation_processes() -> list[str]:
    names = (
        "flower-superlink --insecure --simulation",
        "flwr-simulation",
        "ray::",
        "ray/core/src/ray/",
    )
    return _flower_leftovers(list(names))


@pytest.mark.e2e
@pytest.mark.slow
def test_ctrl_c_leaves_nothing_running(sim_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    before = _simulation_processes()
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "remdr.sim.cli", "--data", str(sim_data), "--out", str(out), "--sites", "2",
        "--rounds", "20", "--image-size", "32", "--n-bscans", "2", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    # A shell's background job (nohup, `&` in CI scripts) starts with SIGINT ignored, and Python
    # keeps an ignored SIGINT: give the child the default a user at a terminal has.
    log = tmp_path / "sim.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        # poll the log file, never block on the child's output: the deadline always holds
        deadline = time.monotonic() + 300
        while "round 1/20" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"remdr-sim exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"training never started:\n{log.read_text()[-3000:]}"
            )
            time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    deadline = time.monotonic() + 30
    while len(_simulation_processes()) > len(before) and time.monotonic() < deadline:
        time.sleep(1)
    assert _simulation_processes() == before


@pytest.mark.e2e
@pytest.mark.slow
def test_private_simulation_reports_epsilon_per_site_and_sites_decline_past_the_ceiling(
    sim_data, tmp_path
):
    """One batch per epoch (q = 1), so round 1 spends exactly epsilon(sigma, 1 step): the
    ceiling lies between one and two rounds' spending and every site declines round 2."""
    from remdr.privacy import PrivacyLedger, epsilon_of

    sigma, delta = 2.0, 1e-5
    one, two = epsilon_of([(sigma, 1.0, 1)], delta), epsilon_of([(sigma, 1.0, 2)], delta)
    out = tmp_path / "run"
    args = [
        "--data", str(sim_data), "--out", str(out), "--sites", "2", "--rounds", "2",
        "--image-size", "32", "--batch-size", "256", "--local-epochs", "1", "--device", "cpu",
        "--set", "embed-dim=16", "--set", "fusion-hidden=16", "--set", "method=remdr_dp",
        "--set", "oct-view=rnflt", "--set", f"dp-noise={sigma}",
        "--set", f"dp-epsilon-max={(one + two) / 2}", "--fed", "site-dp=fixed", "--quiet",
    ]  # fmt: skip
    assert sim_cli.main(args) == 0
    fed = json.loads((out / "report.json").read_text())["federation"]
    privacy = fed["privacy"]
    assert privacy["guarantee"] == "sample-level, site-level"
    sites = privacy["sample_level"]["sites"]
    assert set(sites) == {"site-0", "site-1"}
    for site, info in sites.items():
        assert info["epsilon"] == pytest.approx(one) and info["declined_rounds"] == [2]
        ledger = PrivacyLedger(out / "data" / "sites" / "ledgers" / f"{site}.jsonl").entries()
        assert len(ledger) == 1 and ledger[0]["epsilon_cumulative"] == pytest.approx(one)
    reasons = [e["reason"] for e in fed["rounds"][1]["errors"]]
    assert len(reasons) == 2 and all("privacy budget" in r for r in reasons)
    assert privacy["site_level"]["releases"] == 1
    assert privacy["site_level"]["epsilon"] == pytest.approx(epsilon_of([(1.0, 1.0, 1)], delta))
    assert not _simulation_processes()


@pytest.mark.parametrize(
    "flags, names",
    [
        (["--sites", "0"], ["--sites 0"]),
        (["--alpha", "-1"], ["--alpha -1"]),
        (["--alpha", "nan", "--rounds", "0"], ["--alpha nan", "--rounds 0"]),
        (["--test-fraction", "1"], ["--test-fraction 1"]),
        (
            ["--local-epochs", "0", "--cpus-per-site", "0"],
            ["--local-epochs 0", "--cpus-per-site 0"],
        ),
        # Flower 1.42's simulation config holds whole CPUs: half a CPU failed inside flwr run
        (
            ["--cpus-per-site", "0.5", "--gpus-per-site", "-1"],
            ["--cpus-per-site 0.5", "--gpus-per-site -1"],
        ),
    ],
)
def test_bad_simulator_flags_are_one_line_before_any_work(tmp_path, capsys, flags, names):
    out = tmp_path / "o"
    code = sim_cli.main([*flags, "--out", str(out), "--data", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0]
    assert all(name in err[0] for name in names)
    assert not out.exists()  # refused before anything was made


def test_a_program_asking_for_half_a_cpu_per_site_is_told_why_before_flower_starts(tmp_path):
    with pytest.raises(RemdrError, match="whole number of CPUs"):
        run_federation({}, 2, SimResources(cpus_per_site=0.5), tmp_path / "flower.log")
    assert not (tmp_path / "flower.log").exists()  # refused before Flower was started


def _compared_row(case, seed, final, pooled_final, test_ratio=1.0):
    """The parts of a suite row `suite-compare` reads (`row_of` builds them from a report)."""
    return {
        "case": case, "seed": seed, "final_val_ratio": final / pooled_final,
        "test_ratio": test_ratio, "federated": {"final_val_mse": final, "val_mse": final + 1},
    }  # fmt: skip


def test_suite_compare_pairs_case_seeds_and_applies_the_median_and_worst_rule():
    from remdr.sim.suite_compare import compare, comparison_text

    base = {(c, 0): _compared_row(c, 0, v, 3.0) for c, v in (("a", 3.0), ("b", 4.0), ("c", 5.0))}
    base[("d", 1)] = _compared_row("d", 1, 3.0, 3.0)
    # better on a and b, the same (within 1%) on c: wins, its worst ratio is no higher
    cand = {("a", 0): _compared_row("a", 0, 2.7, 3.0), ("b", 0): _compared_row("b", 0, 3.6, 3.0),
            ("c", 0): _compared_row("c", 0, 4.98, 3.0), ("e", 0): _compared_row("e", 0, 1.0, 3.0)}  # fmt: skip
    r = compare(base, cand)
    assert [k for k, _, _ in r["pairs"]] == [("a", 0), ("b", 0), ("c", 0)]
    assert (r["better"], r["worse"]) == (2, 0) and r["change_median"] == pytest.approx(0.9)
    assert r["wins"] and r["only_base"] == [("d", 1)] and r["only_candidate"] == [("e", 0)]
    text = comparison_text(r)
    assert "2.70 (0.900x)" in text.splitlines()[2] and "better on 2, worse on 0" in text
    assert "the candidate wins" in text and "only in base (not compared): d-s1" in text
    # a lower median, but a higher worst ratio to pooled training: no win
    cand[("c", 0)] = _compared_row("c", 0, 5.6, 3.0)
    r = compare(base, cand)
    assert r["change_median"] < 1 and not r["wins"]
    assert "does not win" in comparison_text(r) and "worst 1.67 → 1.87" in comparison_text(r)
    # a candidate run that diverged (its final validation NaN) counts as worse and cannot win
    cand[("c", 0)] = _compared_row("c", 0, float("nan"), 3.0)
    r = compare(base, cand)
    assert (r["better"], r["worse"], r["unscored"]) == (2, 1, 1) and not r["wins"]
    assert "1 unscored count as worse" in comparison_text(r)


def test_suite_compare_refuses_a_case_seed_twice_and_skips_unreadable_runs(tmp_path, capsys):
    for folder in ("one", "two"):
        (tmp_path / folder / "screening-5-s1").mkdir(parents=True)
        (tmp_path / folder / "screening-5-s1" / "report.json").write_text("{not json")
    base, twice = str(tmp_path / "one"), f"{tmp_path / 'one'},{tmp_path / 'two'}"
    assert sim_cli.main(["suite-compare", "--base", twice, "--candidate", base]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--base: screening-5 seed 1 is in" in err[0]
    assert sim_cli.main(["suite-compare", "--base", base, "--candidate", base]) == 2
    captured = capsys.readouterr()
    assert "base: skipped 1 unreadable run(s)" in captured.out
    assert "JSONDecodeError" in captured.out
    assert "no case-seed is in both sides" in captured.err
    missing = str(tmp_path / "none")
    assert sim_cli.main(["suite-compare", "--base", missing, "--candidate", base]) == 2
    assert "not a folder" in capsys.readouterr().err


def test_a_suite_run_in_pieces_into_one_folder_keeps_every_piece_in_its_table(tmp_path):
    """suite.json kept only the last call's runs; an earlier call's rows of the same settings
    now stay (but not for the case-seeds this call reruns), and rows of other settings are never
    mixed in."""
    from remdr.sim.suite import CASES, SuiteRun, _earlier_rows, _settings

    from remdr.config import ExperimentConfig

    said: list[str] = []
    run = SuiteRun(ExperimentConfig(), out=tmp_path, cases=(CASES["screening-5"],), seeds=(0,))
    rows = [{"case": "screening-5", "seed": 0}, {"case": "quantity-6", "seed": 1}]
    (tmp_path / "suite.json").write_text(json.dumps({**_settings(run), "rows": rows}))
    assert _earlier_rows(run, _settings(run), said.append) == [rows[1]]
    assert "kept 1 run(s)" in said[-1]
    other = SuiteRun(ExperimentConfig(), out=tmp_path, fed={"proximal-mu": "0.1"}, seeds=(0,))
    assert _earlier_rows(other, _settings(other), said.append) == []
    assert "other settings" in said[-1]
    (tmp_path / "suite.json").write_text("[1, 2")
    assert _earlier_rows(run, _settings(run), said.append) == [] and "unreadable" in said[-1]


def _suite_row(case, seed, fed_val, fed_final, test_ratio, central_final=3.0):
    """A suite row as `row_of` builds it, with the numbers `summarise` reads."""
    nan = float("nan")
    return {
        "case": case, "seed": seed, "val_ratio": fed_val / 3.0,
        "final_val_ratio": fed_final / central_final if central_final == central_final else nan,
        "test_ratio": test_ratio, "test_ratio_interval": [nan, nan],
        "federated": {"val_mse": fed_val, "final_val_mse": fed_final, "test_mse": 3.0 * test_ratio,
                      "test_r2": 0.8, "wall_seconds": 1},
        "centralized": {"val_mse": 3.0, "final_val_mse": central_final, "test_mse": 3.0,
                        "test_r2": 0.85, "wall_seconds": 1},
    }  # fmt: skip


def test_a_suite_summary_counts_a_diverged_run_as_the_worst_in_any_order():
    """`max` over ratios holding a NaN answered by the order of the runs: a diverged federation
    could vanish from the worst case. It now makes the worst NaN and is named; a run whose
    centralized arm (cached by an older remdr) has no final validation MSE is left out of that
    ratio only."""
    from remdr.sim.suite_rows import summarise, table

    nan = float("nan")
    rows = [_suite_row("a", 0, 3.3, 3.0, 1.1), _suite_row("b", 0, 3.6, 3.3, 1.2),
            _suite_row("c", 0, nan, nan, nan)]  # fmt: skip
    for order in (rows, rows[::-1], [rows[2], rows[0], rows[1]]):
        s = summarise(order)
        assert math.isnan(s["val_ratio_worst"]) and math.isnan(s["test_ratio_worst"])
        assert math.isnan(s["final_val_ratio_worst"]) and s["unscored"] == ["c-s0"]
        assert s["test_ratio_median"] == pytest.approx(1.15)
    assert "unscored (a NaN number" in table(rows, summarise(rows))
    old_cache = [rows[0], _suite_row("b", 0, 3.6, 3.3, 1.2, central_final=nan)]
    s = summarise(old_cache)
    assert s["final_val_ratio_worst"] == pytest.approx(1.0) and s["unscored"] == []
    assert s["test_ratio_worst"] == pytest.approx(1.2)


def _report_with_reference(fed_final: float, ref_final: float) -> dict:
    """The parts of a suite run's report.json that `row_of` reads, with a reference arm."""
    tested = {"test": {"mse": 3.0, "r2": 0.8, "md_var": 24.0}, "wall_seconds": 1.0}
    return {
        "config": {"train": {"method": "remdr"}},
        "run_config": {"method": "remdr", "lr": 0.001},
        "partition": {"sites": {"site-0": {"eyes": 10}}},
        "federation": {"best": {"val-mse": fed_final + 1, "head-refit": {"val-mse": fed_final}}},
        "results": {
            "federated": tested,
            "centralized": {"best_val_mse": 3.0, "final_val_mse": 3.0, **tested},
            "reference": {
                "method": "concat",
                "val_mse": ref_final + 1,
                "head_refit": {"val-mse": ref_final},
                **tested,
            },
        },  # fmt: skip
    }


def test_suite_compare_weighs_the_method_against_its_reference_arm_run_by_run(tmp_path, capsys):
    folder = tmp_path / "ref-s0"
    for case, fed, ref in (("a", 3.0, 3.5), ("b", 4.0, 4.2), ("c", 3.3, 3.3)):
        (folder / f"{case}-s0").mkdir(parents=True)
        report = _report_with_reference(fed, ref)
        (folder / f"{case}-s0" / "report.json").write_text(json.dumps(report))
    assert sim_cli.main(["suite-compare", "--reference", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "the method remdr (candidate) against its reference concat (base)" in out
    assert "| a | 0 | 3.50 → 3.00 (0.857x)" in out and "better on 2, worse on 0" in out
    assert "the candidate wins" in out
    from remdr.sim.suite_rows import row_of, summarise, table  # the suite's own line says the same

    rows = [
        row_of(_report_with_reference(f, r), c, 0) for c, f, r in (("a", 3.0, 3.5), ("b", 4.0, 4.2))
    ]
    assert "(best rounds; final models 3.50 vs 3.85)" in table(rows, summarise(rows))
    diverged = _report_with_reference(3.0, float("nan"))  # a reference that says nothing
    (folder / "d-s0").mkdir()
    (folder / "d-s0" / "report.json").write_text(json.dumps(diverged))
    assert sim_cli.main(["suite-compare", "--reference", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "d-s0 (its reference unscored)" in out and "better on 2, worse on 0" in out
    # a suite run without --reference has nothing to compare within
    plain = _report_with_reference(3.0, 3.0)
    del plain["results"]["reference"]
    (tmp_path / "plain" / "a-s0").mkdir(parents=True)
    (tmp_path / "plain" / "a-s0" / "report.json").write_text(json.dumps(plain))
    assert sim_cli.main(["suite-compare", "--reference", str(tmp_path / "plain")]) == 2
    assert "no run has a reference arm" in capsys.readouterr().err
    both = ["suite-compare", "--reference", str(folder), "--base", str(folder)]
    assert sim_cli.main(both) == 2
    assert "--reference with --base or --candidate" in capsys.readouterr().err
    assert sim_cli.main(["suite-compare", "--base", str(folder)]) == 2
    assert "--base and --candidate" in capsys.readouterr().err
