"""Plots a person looks at: predicted vs true MD, per-bin errors, learning curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from remdr.metrics import BIN_EDGES, BINS, regression_metrics, severity_bins  # noqa: E402

BIN_COLOURS = ("#4c9a2a", "#e0a800", "#e8590c", "#c92a2a")


def scatter_pred_vs_true(y: np.ndarray, p: np.ndarray, path: Path, title: str = "") -> None:
    m = regression_metrics(y, p)
    fig, ax = plt.subplots(figsize=(4.8, 4.6))
    bins = severity_bins(y)
    for b, name in enumerate(BINS):
        mask = bins == b
        if mask.any():
            ax.scatter(
                y[mask],
                p[mask],
                s=10,
                alpha=0.7,
                color=BIN_COLOURS[b],
                label=f"{name} ({mask.sum()})",
            )
    lo = float(min(y.min(), p.min(), -30)) - 1
    hi = float(max(y.max(), p.max(), 2)) + 1
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    for edge in BIN_EDGES:
        ax.axvline(edge, color="0.85", lw=0.6, zorder=0)
    ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel="true MD (dB)", ylabel="predicted MD (dB)")
    ax.set_title(f"{title}  MSE {m['mse']:.2f}  MAE {m['mae']:.2f}  R² {m['r2']:.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def bars_per_bin(
    results: dict[str, dict[str, float]], path: Path, title: str = "MAE per severity bin"
) -> None:
    """results: name -> metrics dict with mae_<bin> keys (and optional mae_<bin>_std)."""
    names = list(results)
    x = np.arange(len(BINS))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(names) + 3), 3.8))
    for i, name in enumerate(names):
        vals = [results[name].get(f"mae_{b}", np.nan) for b in BINS]
        errs = [results[name].get(f"mae_{b}_std", 0.0) for b in BINS]
        ax.bar(x + i * width - 0.4 + width / 2, vals, width, yerr=errs, label=name, capsize=2)
    ax.set_xticks(x, BINS)
    ax.set_ylabel("MAE (dB)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=min(4, len(names)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_curves(
    series: dict[str, list[tuple[int, float]]],
    path: Path,
    ylabel: str,
    title: str = "",
    levels: dict[str, float] | None = None,
) -> None:
    """Curves per series, and `levels` (e.g. the centralized model's) as horizontal lines."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    for (name, level), style in zip((levels or {}).items(), ("--", ":", "-."), strict=False):
        ax.axhline(level, color="gray", ls=style, lw=1.0, label=name)
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def method_curves(means: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> None:
    """Validation and test MSE against epochs, one line per method (means over seeds)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, title in zip(axes, ("val_mse", "test_mse"), ("validation", "test"), strict=True):
        for name, series in means.items():
            xs, ys = zip(*series[key], strict=True)
            ax.plot(xs, ys, marker="o", ms=3, label=name)
        ax.set(xlabel="epoch", ylabel="MSE (dB²)", title=f"{title} MSE, mean over seeds")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
