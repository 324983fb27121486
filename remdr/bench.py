"""Benchmarks: methods compared on the same splits and seeds, and training speed ratios.

Speed is measured, never asserted: step times of several methods are taken in the same process,
interleaved round by round after a warm-up, so machine noise hits all of them alike, and reported
as ratios to `concat`.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from remdr.config import ExperimentConfig, apply_overrides
from remdr.errors import ConfigError
from remdr.experiment import SplitData, train_and_test
from remdr.methods import build_model, create_method
from remdr.metrics import BINS
from remdr.runtime import autocast_for, prepare_model, resolve_device, seed_everything, to_device
from remdr.settings import show
from remdr.train import make_loader, make_optimizer

log = logging.getLogger(__name__)

TABLE_COLUMNS = (
    ("val_mse", "val MSE", min),  # what a choice between rows may be made on
    ("mse", "MSE", min),
    ("mae", "MAE", min),
    ("r2", "R²", max),
    ("pearson", "Pearson", max),
    *((f"mae_{b}", f"MAE {b}", min) for b in BINS),
    ("mae_bin_avg", "bin-avg MAE", min),
    *((f"mae_{r}_shot", f"MAE {r}-shot", min) for r in ("many", "medium", "few")),
)
# The DIR protocol's regions (Yang et al., ICML 2021): a test eye is many-, medium- or few-shot
# by how many training eyes share its 1 dB label bin; the limits are AgeDB-DIR's (100 / 20 per
# bin) scaled to ~850 training eyes, so on the synthetic default normal and early eyes are
# many-shot and most severe eyes few-shot.
SHOT_BIN_DB = 1.0
SHOT_LIMITS = (20, 5)  # many: >= 20 training eyes in the bin; few: < 5; medium: between


def shot_metrics(train_md: np.ndarray, md: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """MAE over the test eyes of each DIR region (NaN for an empty region) and their counts."""
    edges = np.arange(-40.0, 10.0 + SHOT_BIN_DB, SHOT_BIN_DB)
    counts, _ = np.histogram(np.clip(train_md, -40, 10), bins=edges)
    known = np.isfinite(pred)
    md, pred = np.asarray(md)[known], np.asarray(pred)[known]
    per_eye = counts[np.clip(np.digitize(md, edges) - 1, 0, len(counts) - 1)]
    many, few = SHOT_LIMITS
    regions = {"many": per_eye >= many, "few": per_eye < few}
    regions["medium"] = ~regions["many"] & ~regions["few"]
    out: dict[str, float] = {}
    for name, rows in regions.items():
        out[f"n_{name}_shot"] = int(rows.sum())
        out[f"mae_{name}_shot"] = (
            float(np.abs(pred[rows] - md[rows]).mean()) if rows.any() else float("nan")
        )
    return out


def run_methods(
    cfg: ExperimentConfig,
    data: SplitData,
    methods: list[str],
    seeds: list[int],
    on_result: Callable[[dict], None] | None = None,
    progress: bool = True,
    curves: list[dict] | None = None,
    variants: list[dict[str, str]] | None = None,
    load: Callable[[ExperimentConfig], SplitData] | None = None,
) -> tuple[list[dict], dict[str, dict[str, np.ndarray]]]:
    """Train every method with every seed on the same split; return result rows and, per method,
    the first seed's test predictions (for plots). With `curves` (a list), also append the
    validation and test MSE after every epoch of every run (the learning curves). `variants`
    (config overrides, e.g. ``{"sam-every": "4"}``) run every method once per variant, each
    labelled ``name [key=value]`` (`run_labels`): an ablation on the same split and seeds. A
    variant of a data key (image size, B-scans, OCT view) reads the data again with `load`."""
    rows: list[dict] = []
    preds: dict[str, dict[str, np.ndarray]] = {}
    variants = variants or [{}]
    loaded: dict[str, SplitData] = {repr(cfg.data): data}

    def data_for(run_cfg: ExperimentConfig) -> SplitData:
        key = repr(run_cfg.data)
        if key not in loaded:
            if load is None:
                raise ConfigError(
                    "a variant of a data key", "needs the data read again", "pass `load`"
                )
            loaded[key] = load(run_cfg)
        return loaded[key]

    for seed in seeds:
        for name in methods:
            for variant in variants:
                label = run_label(name, variant)
                run_cfg = apply_overrides(cfg, {**variant, "method": name, "seed": seed})
                out = train_and_test(
                    run_cfg, data_for(run_cfg), progress=progress, desc=f"{label} s{seed}",
                    test_curve=curves is not None,
                )  # fmt: skip
                row = _record(label, seed, out, curves, data_for(run_cfg).train.targets())
                rows.append(row)
                preds.setdefault(
                    label, {"md": out.test_preds["md"], "pred": out.test_preds["pred"]}
                )
                if on_result:
                    on_result(row)
    return rows, preds


def run_label(method: str, variant: dict[str, str]) -> str:
    """`remdr [sam-every=4, lds-reweight=0.5]`: the method and what its variant changed."""
    if not variant:
        return method
    return f"{method} [{', '.join(f'{k}={show(v).strip(chr(39))}' for k, v in variant.items())}]"


def run_labels(methods: list[str], variants: list[dict[str, str]] | None) -> list[str]:
    return [run_label(n, v) for n in methods for v in (variants or [{}])]


def _record(label: str, seed: int, out, curves: list[dict] | None, train_md=()) -> dict:
    """One run's result row (and its learning curve appended to `curves`)."""
    if curves is not None:
        for record, (_, test_mse) in zip(out.fit.history, out.test_curve, strict=False):
            curves.append(
                {
                    "method": label,
                    "seed": seed,
                    "epoch": record["epoch"],
                    "val_mse": record.get("val_mse", float("nan")),
                    "test_mse": test_mse,
                }
            )
    return {
        "method": label,
        "seed": seed,
        "train_seconds": out.fit.seconds,
        "val_mse": out.fit.best_val_mse,
        "best_epoch": out.fit.best_epoch,
        "epochs_run": len(out.fit.history),
        **out.test_metrics,
        **shot_metrics(np.asarray(train_md), out.test_preds["md"], out.test_preds["pred"]),
    }


def summarise(rows: list[dict], methods: list[str]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of every metric, per method (keys `k` and `k_std`)."""
    out: dict[str, dict[str, float]] = {}
    for name in methods:
        mine = [r for r in rows if r["method"] == name]
        summary: dict[str, float] = {"runs": len(mine)}
        for key in [k for k, _, _ in TABLE_COLUMNS] + ["train_seconds", "within_2db", "best_epoch"]:
            vals = [r[key] for r in mine if key in r and np.isfinite(r[key])]
            summary[key] = float(np.mean(vals)) if vals else float("nan")
            summary[f"{key}_std"] = float(np.std(vals)) if len(vals) > 1 else 0.0
        out[name] = summary
    return out


def markdown_table(summary: dict[str, dict[str, float]], note: str = "") -> str:
    """Mean ± std per method, the best mean per column in bold."""
    names = list(summary)
    best = {}
    for key, _, pick in TABLE_COLUMNS:
        vals = [summary[n][key] for n in names if np.isfinite(summary[n][key])]
        best[key] = pick(vals) if vals else None
    head = (
        "| method | "
        + " | ".join(label for _, label, _ in TABLE_COLUMNS)
        + " | best epoch | s/run |"
    )
    sep = "|---" * (len(TABLE_COLUMNS) + 3) + "|"
    lines = [head, sep]
    for n in names:
        cells = []
        for key, _, _ in TABLE_COLUMNS:
            v, s = summary[n][key], summary[n][f"{key}_std"]
            cell = "n/a" if not np.isfinite(v) else f"{v:.2f} ± {s:.2f}"
            cells.append(f"**{cell}**" if best[key] is not None and v == best[key] else cell)
        epoch = summary[n]["best_epoch"]
        epoch_cell = f"{epoch:.1f}" if np.isfinite(epoch) else "n/a"
        lines.append(
            f"| {n} | "
            + " | ".join(cells)
            + f" | {epoch_cell} | {summary[n]['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + ("\n\n" + note if note else "") + "\n"


def write_results(
    out: Path, rows: list[dict], summary: dict[str, dict[str, float]], note: str
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k not in ("method", "seed"), k))
    with (out / "results.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    (out / "results.md").write_text(markdown_table(summary, note))


def write_curves(out: Path, curves: list[dict], methods: list[str]) -> str:
    """curves.csv, learning_curves.png (mean over seeds) and a markdown table: per method, the
    epoch of the lowest mean validation MSE (where it saturates; chosen on validation only) and
    the test MSE there and at the last epoch."""
    from remdr.plots import method_curves

    out.mkdir(parents=True, exist_ok=True)
    with (out / "curves.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "seed", "epoch", "val_mse", "test_mse"])
        writer.writeheader()
        writer.writerows(curves)
    means: dict[str, dict[str, list[tuple[int, float]]]] = {}
    lines = [
        "| method | best epoch (mean val MSE) | val MSE there | test MSE there | test MSE, last epoch |",
        "|---|---|---|---|---|",
    ]
    for name in methods:
        epochs = sorted({c["epoch"] for c in curves if c["method"] == name})
        if not epochs:
            continue
        mean = {
            key: [
                (
                    e,
                    float(
                        np.nanmean(
                            [c[key] for c in curves if c["method"] == name and c["epoch"] == e]
                        )
                    ),
                )
                for e in epochs
            ]
            for key in ("val_mse", "test_mse")
        }
        means[name] = mean
        best = min(range(len(epochs)), key=lambda i: mean["val_mse"][i][1])
        lines.append(
            f"| {name} | {epochs[best]} | {mean['val_mse'][best][1]:.2f} | "
            f"{mean['test_mse'][best][1]:.2f} | {mean['test_mse'][-1][1]:.2f} |"
        )
    method_curves(means, out / "learning_curves.png")
    return "\n".join(lines) + "\n"


# -- speed ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class SpeedResult:
    method: str
    step_seconds: float  # median over rounds
    pairs_per_second: float
    peak_memory_mb: float | None  # CUDA only


def measure_speed(
    cfg: ExperimentConfig,
    data: SplitData,
    methods: list[str],
    *,
    steps: int = 5,
    rounds: int = 5,
    warmup: int = 3,
) -> list[SpeedResult]:
    """Per-step training time of each method on the same batches, interleaved by round."""
    device = resolve_device(cfg.train.device)
    seed_everything(cfg.train.seed, device)
    loader = make_loader(data.train, cfg.train.batch_size, shuffle=True, seed=0, device=device)
    batches = []
    for b in loader:
        batches.append(to_device(b, device))
        if len(batches) == steps:
            break
    autocast = autocast_for(device)
    runners = {}
    for name in methods:
        method = create_method(name, cfg.method)
        method.setup(data.train.targets())
        model = prepare_model(build_model(cfg, method), device).train()
        opt = make_optimizer(model, cfg.train)
        if method.spec.private:  # the real DP-SGD step: Opacus' per-sample clip and noise
            from remdr.privacy import open_private

            session = open_private(
                model,
                opt,
                data.train,
                loss_fn=lambda m, b, method=method: method.loss(m, b)[0],
                method_name=method.name,
                train_cfg=cfg.train,
                privacy=dataclasses.replace(cfg.privacy, dp_epsilon_max=1e12, dp_ledger=""),
                epochs=1,
            )
            model, opt = session.module, session.optimizer
        runners[name] = (method, model, opt)

    def run(name: str, n_steps: int) -> float:
        method, model, opt = runners[name]
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for i in range(n_steps):
            method.step(model, opt, batches[i % len(batches)], 0, autocast)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n_steps

    peaks: dict[str, float | None] = {}
    for name in methods:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(name, warmup)
        peaks[name] = (
            torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        )
    times: dict[str, list[float]] = {n: [] for n in methods}
    for r in range(rounds):
        order = methods if r % 2 == 0 else list(reversed(methods))
        for name in order:
            times[name].append(run(name, len(batches)))
    batch = batches[0]["md"].shape[0]
    return [
        SpeedResult(n, statistics.median(times[n]), batch / statistics.median(times[n]), peaks[n])
        for n in methods
    ]
