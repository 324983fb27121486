"""The simulator's human-readable report (report.md) and its plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from remdr.metrics import BINS


def per_site_plot(results: dict, last: dict[str, dict], path: Path) -> None:
    """Like with like: the global test set for every model (each site alone as bars, federated
    and centralized as lines), and separately the global model on each site's validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(last)
    x = np.arange(len(names))
    fig, (test_ax, val_ax) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(names) + 3), 3.6))
    if "local" in results:
        test_ax.bar(x, [results["local"][n]["test"]["mse"] for n in names], 0.6,
                    label="site alone")  # fmt: skip
    test_ax.axhline(results["federated"]["test"]["mse"], color="k", ls="--", lw=0.8, zorder=3,
                    label="federated")  # fmt: skip
    if "centralized" in results:
        test_ax.axhline(results["centralized"]["test"]["mse"], color="gray", ls=":", lw=1.0, zorder=3,
                        label="centralized")  # fmt: skip
    test_ax.set_title("global test set" + ("" if "local" in results else
                      " (--compare-local adds each site alone)"), fontsize=9)  # fmt: skip
    test_ax.set_xlim(-0.5, len(names) - 0.5)
    test_ax.set_ylim(bottom=0)
    val_ax.bar(x, [last[n].get("eval-val-mse", np.nan) for n in names], 0.6, color="tab:orange")
    val_ax.set_title("federated model, each site's validation patients", fontsize=9)
    for ax in (test_ax, val_ax):
        ax.set_xticks(x, names)
        ax.set_ylabel("MSE (dB²)")
    test_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def wallclock_plot(results: dict, path: Path) -> None:
    """Test MSE against wall-clock seconds: federated after every k-th round (at most 9 points),
    centralized after each epoch, and the centralized final level as a reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name, style in (("federated", "o-"), ("centralized", "s-")):
        curve = results.get(name, {}).get("test_curve") or []
        if curve:
            xs, ys = zip(*curve, strict=True)
            ax.plot(xs, ys, style, ms=3, label=name)
    if "centralized" in results:
        ax.axhline(
            results["centralized"]["test"]["mse"], color="gray", ls="--", lw=0.8,
            label="centralized, final (best-validation) model",
        )  # fmt: skip
    ax.set_xlabel("wall-clock seconds (federated: from Flower's start)")
    ax.set_ylabel("test MSE (dB²)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sim_report(out: Path, report: dict, fed_preds: dict[str, np.ndarray]) -> Path:
    import matplotlib

    matplotlib.use("Agg")

    from remdr.plots import learning_curves, scatter_pred_vs_true

    results = report["results"]
    fed = report["federation"]
    scatter_pred_vs_true(
        fed_preds["md"], fed_preds["pred"], out / "pred_vs_true.png", title="federated (test)"
    )
    series = {
        "global (weighted)": [
            (r["round"], r.get("evaluate", {}).get("val-mse")) for r in fed["rounds"]
        ]
    }
    for site, rows in fed["sites"].items():
        series[site] = [(row["round"], row.get("eval-val-mse")) for row in rows]
    series = {k: [(x, y) for x, y in v if y is not None] for k, v in series.items()}
    levels = {}
    if "best_val_mse" in results.get("centralized", {}):  # the same validation patients
        levels["centralized, best validation MSE"] = results["centralized"]["best_val_mse"]
    learning_curves(
        series, out / "learning_curves.png", "validation MSE (dB²)", "federated rounds", levels
    )

    wallclock_plot(results, out / "wallclock.png")

    last = fed["rounds"][-1]["sites"] if fed["rounds"] else {}
    per_site_plot(results, last, out / "per_site.png")

    part = report["partition"]
    lines = [
        "# remdr-sim report",
        "",
        f"Method `{report['run_config']['method']}`, strategy `{report['run_config']['strategy']}`, "
        f"{report['run_config']['num-server-rounds']} rounds x {local_work(report['run_config'])}, "
        f"{len(part['sites'])} sites, partition `{part['spec']['scheme']}` (alpha {part['spec']['alpha']}). "
        f"Total wall time {report['wall_seconds']:.0f} s.",
        "",
        "## Test set (held out from every site)",
        "",
        "| model | test MSE (dB²) | MAE (dB) | bin-avg MAE | R² | Pearson | within ±2 dB | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = [("federated", results["federated"])]
    for kind, label in (("oct", "OCT"), ("fundus", "fundus")):
        if f"test_{kind}_only" in results["federated"]:
            rows.append(
                (
                    f"federated, {label} input only",
                    {"test": results["federated"][f"test_{kind}_only"]},
                )
            )
    if "complete_sites_only" in results:
        sites = ", ".join(results["complete_sites_only"]["sites"])
        rows.append((f"federated, complete sites only ({sites})", results["complete_sites_only"]))
    if "centralized" in results:
        rows.append(("centralized (union of sites)", results["centralized"]))
    rows += [(f"{n} alone", r) for n, r in results.get("local", {}).items()]
    for name, r in rows:
        m = r["test"]
        wall = f"{r['wall_seconds']:.0f}" if "wall_seconds" in r else ""
        lines.append(
            f"| {name} | {m['mse']:.2f} | {m['mae']:.2f} | {m['mae_bin_avg']:.2f} | {m['r2']:.2f} | "
            f"{m['pearson']:.2f} | {m['within_2db']:.0f}% | {wall} |"
        )
    m = results["federated"]["test"]
    lines += [
        "",
        f"Test MD variance: {m['md_var']:.2f} dB² (the MSE of always predicting the mean). "
        "Per-bin MAE of the federated model: "
        + ", ".join(f"{b} {m[f'mae_{b}']:.2f}" for b in BINS)
        + " dB.",
        *(f"\n{line}." for line in ratio_lines(results, report.get("test_md", []))),
        "",
        "## Sites (eyes per severity bin)",
        "",
        "| site | eyes | patients | " + " | ".join(BINS) + " |",
        "|---|---|---|" + "---|" * len(BINS),
    ]
    for name, s in part["sites"].items():
        lines.append(
            f"| {name} | {s['eyes']} | {s['patients']} | "
            + " | ".join(str(s["bins"][b]) for b in BINS)
            + " |"
        )
    lines.append(
        f"| test | {part['test']['eyes']} | | "
        + " | ".join(str(part["test"]["bins"][b]) for b in BINS)
        + " |"
    )
    lines += [
        "",
        "## Rounds",
        "",
        "| round | global val MSE | " + " | ".join(sorted(last)) + " | seconds |",
        "|---|---|" + "---|" * len(last) + "---|",
    ]
    for r in fed["rounds"]:
        per = " | ".join(
            f"{r['sites'].get(n, {}).get('eval-val-mse', float('nan')):.2f}" for n in sorted(last)
        )
        lines.append(
            f"| {r['round']} | {r.get('evaluate', {}).get('val-mse', float('nan')):.2f} | {per} | {r['seconds']:.1f} |"
        )
    lines += _privacy_lines(fed.get("privacy") or {})
    lines += [
        "",
        "Plots: `learning_curves.png`, `wallclock.png` (test MSE against seconds, federated and centralized), `pred_vs_true.png`, `per_site.png`. Machine-readable: `report.json`; "
        "partition: `data/partition.json`; per-round checkpoints: `federation/`.",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _privacy_lines(privacy: dict) -> list[str]:
    """The run's guarantee, per granularity; "none" said out loud when there is none."""
    lines = ["", "## Privacy", "", f"Guarantee: **{privacy.get('guarantee', 'none')}**."]
    sample = privacy.get("sample_level")
    if sample:
        lines += ["", "| site | epsilon (patient) | delta | sigma | C | q | declined rounds |"]
        lines.append("|---|---|---|---|---|---|---|")
        for site, p in sorted(sample["sites"].items()):
            lines.append(
                f"| {site} | {p.get('epsilon', float('nan')):.2f} | {p.get('delta')} | "
                f"{p.get('noise_multiplier')} | {p.get('clip')} | {p.get('sample_rate', 0):.4f} | "
                f"{', '.join(map(str, p.get('declined_rounds', []))) or '-'} |"
            )
    site = privacy.get("site_level")
    if site:
        lines += [
            "",
            f"Site-level: epsilon {site['epsilon']:.2f} at delta {site['delta']:g} after "
            f"{site['releases']} noised aggregate(s) (z {site['noise_multiplier']}, "
            f"C {site['clip']}).",
        ]
    if sample or site:
        lines += ["", f"Not covered: {privacy.get('not_covered', '')}."]
    return lines


def ratio_lines(results: dict, test_md) -> list[str]:
    """The federation's test MSE over each comparison arm's, with the 95% interval of that
    ratio over the test eyes: how much of a difference the test set can tell from chance."""
    from remdr.sim.arms import paired_interval

    fed = results["federated"]
    pairs = [("centralized", "federated / centralized")]
    if "reference" in results:
        pairs.append(("reference", f"federated / federated {results['reference']['method']}"))
    pairs.append(("complete_sites_only", "all sites / complete sites alone"))
    lines = []
    for key, label in pairs:
        if key not in results:
            continue
        ratio, low, high = paired_interval(test_md, fed, results[key])
        if np.isfinite(low) and np.isfinite(high):
            interval = f"95% interval over the test eyes {low:.2f}-{high:.2f}"
        else:  # no per-eye predictions to pair (an older cached arm): the ratio alone
            ratio, interval = fed["test"]["mse"] / results[key]["test"]["mse"], "interval -"
        lines.append(f"{label} test MSE {ratio:.2f}x ({interval})")
    return lines


def summary_table(results: dict, test_md=()) -> str:
    rows = [("federated", results["federated"])]
    for kind in ("oct", "fundus"):
        if f"test_{kind}_only" in results["federated"]:
            rows.append(
                (f" {kind} input only", {"test": results["federated"][f"test_{kind}_only"]})
            )
    if "complete_sites_only" in results:
        rows.append(("complete sites", results["complete_sites_only"]))
    if "reference" in results:
        rows.append((f"federated {results['reference']['method']}", results["reference"]))
    if "centralized" in results:
        rows.append(("centralized", results["centralized"]))
    for name, r in results.get("local", {}).items():
        rows.append((f"local {name}", r))
    width = max(16, *(len(name) for name, _ in rows))  # " fundus input only", "local site-12"
    lines = [
        f"{'':{width}s} {'test MSE':>9s} {'MAE':>6s} {'bin-avg MAE':>12s} {'R²':>6s} {'wall s':>7s}"
    ]
    for name, r in rows:
        m = r["test"]
        lines.append(
            f"{name:{width}s} {m['mse']:9.2f} {m['mae']:6.2f} {m['mae_bin_avg']:12.2f} {m['r2']:6.2f} "
            + (f"{r['wall_seconds']:7.0f}" if "wall_seconds" in r else f"{'':>7s}")
        )
    var = results["federated"]["test"]["md_var"]
    lines.append(f"(test MD variance {var:.2f} dB²: predicting the mean scores MSE {var:.2f})")
    lines += ratio_lines(results, test_md)
    refits = [f"{name.strip()} {_refit(r['head_refit'])}" for name, r in rows if "head_refit" in r]
    if any(r.get("head_refit") for _, r in rows):
        lines.append("head refit (validation MSE of each head's eyes): " + "; ".join(refits))
    blends = [f"{name.strip()} {_blend(r['head_blend'])}" for name, r in rows if "head_blend" in r]
    if blends:
        lines.append("head blend (chosen on validation): " + "; ".join(blends))
    return "\n".join(lines)


def _refit(choice: dict | None) -> str:
    if not choice:
        return "off"
    heads = [h for h in ("fusion", "oct", "fundus") if h in choice]
    which = f"{choice['model']}: " if "model" in choice else ""  # a federation's candidates
    return which + ", ".join(f"{h} {_change(choice[h])}" for h in heads)


def _change(head: dict) -> str:
    before, after = head.get("val-mse-before"), head.get("val-mse")
    if before is None or after is None:  # no validation eyes for this head: kept as trained
        return "kept (no validation eyes)"
    return f"{before:.2f} -> {after:.2f}"


def _blend(choice: dict | None) -> str:
    if not choice:
        return "none (the fusion head alone)"
    return f"{choice['modality']} head at {choice['weight']:.2f}"


def local_work(run_config: dict) -> str:
    """What one site trains per round, in the words the run config uses."""
    steps = int(run_config.get("local-steps", 0) or 0)
    return f"{steps} local steps" if steps > 0 else f"{run_config['local-epochs']} local epoch(s)"
