"""The coordinator's run directory: a checkpoint per round, the best model, the report.

Layout: ``round-NNN.safetensors`` + ``round-NNN.json`` (round, config, aggregated and per-site
metrics, missing sites, errors), ``round-NNN.strategy.safetensors`` (the server strategy's state:
FedAdam moments), ``best.safetensors`` (lowest aggregated validation MSE; a site's own test split
never enters that choice), ``site-dp-releases.jsonl`` (one line per site-level DP release, written
when it is made), ``run-key`` (this run's identity, which sites key their cross-round state by),
``report.json`` and ``learning_curves.png``. Restarting with the same directory resumes after
the last complete round. No Flower imports: the ServerApp calls this.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file

from remdr import __version__
from remdr.head_blend import Blend, choose
from remdr.registry import MODALITIES

ROUND_RE = re.compile(r"round-(\d{3,})\.json$")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class RunDirectory:
    def __init__(self, out_dir: str | Path) -> None:
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _round_path(self, r: int, ext: str) -> Path:
        return self.dir / f"round-{r:03d}.{ext}"

    def completed_rounds(self) -> list[int]:
        """Rounds whose weights and record were both written (the record is written last)."""
        rounds = []
        for p in self.dir.glob("round-*.json"):
            m = ROUND_RE.search(p.name)
            if m and self._round_path(int(m.group(1)), "safetensors").is_file():
                rounds.append(int(m.group(1)))
        return sorted(rounds)

    def last_round(self) -> int:
        rounds = self.completed_rounds()
        return rounds[-1] if rounds else 0

    def load_weights(self, r: int) -> dict[str, torch.Tensor]:
        return load_file(str(self._round_path(r, "safetensors")))

    def record(self, r: int) -> dict[str, Any]:
        return json.loads(self._round_path(r, "json").read_text())

    def records(self) -> list[dict[str, Any]]:
        return [self.record(r) for r in self.completed_rounds()]

    def run_key(self) -> str:
        """This run's identity for the sites: the directory's name and a random token made when
        the run started, the same after every restart, different for a new run in a new
        directory of the same name."""
        path = self.dir / "run-key"
        if not path.is_file():
            _atomic_write(path, f"{self.dir.name}-{secrets.token_hex(4)}")
        return path.read_text().strip()

    def record_release(self, release: dict[str, Any]) -> None:
        """Journal one site-level DP release the moment it is made (before the model leaves the
        coordinator): a crash before the round's checkpoint cannot lose it, and the round
        redone after a restart is a second release, journalled again."""
        with open(self.dir / "site-dp-releases.jsonl", "a") as f:
            f.write(json.dumps(clean(release), default=_jsonable) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def releases(self) -> list[dict[str, Any]]:
        path = self.dir / "site-dp-releases.jsonl"
        if not path.is_file():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def load_strategy_state(self, r: int) -> tuple[dict[str, np.ndarray], dict]:
        """The server strategy's state saved with round `r` (empty if it had none)."""
        path = self._round_path(r, "strategy.safetensors")
        arrays = load_numpy(str(path)) if path.is_file() else {}
        return arrays, self.record(r).get("strategy_state", {})

    def save_round(
        self,
        r: int,
        state: dict[str, torch.Tensor],
        record: dict[str, Any],
        strategy_state: tuple[dict[str, np.ndarray], dict] | None = None,
    ) -> None:
        """Weights and strategy state first, then the record: a crash before the record is
        written leaves the round incomplete."""
        weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        meta = {"remdr_version": __version__, "round": str(r)}
        save_file(weights, str(self._round_path(r, "safetensors")), metadata=meta)
        if strategy_state is not None:
            arrays, scalars = strategy_state
            if arrays:
                contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
                save_numpy(contiguous, str(self._round_path(r, "strategy.safetensors")), meta)
            record = {**record, "strategy_state": scalars}
        _atomic_write(
            self._round_path(r, "json"),
            json.dumps(clean({"round": r, **record}), indent=2, default=_jsonable),
        )
        self._maybe_best(r, record, weights)

    def add_evaluation(
        self, r: int, aggregate: dict[str, Any], per_site: dict[str, dict[str, Any]]
    ) -> None:
        """Attach the sites' validation of round `r`'s model, measured after the record was
        written (in the next round's train replies, or the final evaluation), and move
        `best.safetensors` to it if it is now the best round."""
        if not self._round_path(r, "json").is_file():
            return
        record = self.record(r)
        record["evaluate"] = aggregate
        sites = record.setdefault("sites", {})
        for site, metrics in per_site.items():
            sites.setdefault(site, {}).update(metrics)
        _atomic_write(
            self._round_path(r, "json"), json.dumps(clean(record), indent=2, default=_jsonable)
        )
        self._maybe_best(r, record)

    def _maybe_best(
        self, r: int, record: dict[str, Any], weights: dict[str, torch.Tensor] | None = None
    ) -> None:
        val = record.get("evaluate", {}).get("val-mse")
        if val is None or not math.isfinite(val) or val > self.best_val_mse():
            return
        weights = weights if weights is not None else self.load_weights(r)
        # `head-blend`, chosen by the sites' pooled validation
        self._write_best(weights, {"round": r, "val-mse": val}, choose_blend(record["evaluate"]))

    def save_refit(
        self, weights: dict[str, torch.Tensor], refit: dict[str, Any], blend: Blend | None
    ) -> None:
        """The final model with `head-refit`'s output layers (`weights`: the best round's, or
        the last rounds' mean, as `refit["model"]` names it) and the blend chosen after it into
        best.safetensors; best.json keeps the round and its validation MSE (by which a resumed
        run compares later rounds) and adds `head-refit`."""
        best = self.best()
        if best is None:
            return
        best.pop("head-blend", None)
        self._write_best(weights, {**best, "head-refit": refit}, blend)

    def _write_best(self, weights: dict, best: dict[str, Any], blend: Blend | None) -> None:
        """best.safetensors with the blend (where it weighs anything) and best.json."""
        meta = {"remdr_version": __version__, "round": str(best["round"])}
        if "model" in best.get("head-refit", {}):  # the weights may be a mean of rounds
            meta["model"] = best["head-refit"]["model"]
        if blend is not None and blend.weight > 0:
            weights = {**weights, "head_blend": blend.weights(MODALITIES)}
            best = {**best, "head-blend": blend.to_dict()}
        save_file(weights, str(self.dir / "best.safetensors"), metadata=meta)
        _atomic_write(self.dir / "best.json", json.dumps(clean(best)))

    def best(self) -> dict[str, Any] | None:
        """best.json: the best round, its validation MSE, its `head-blend` choice and, once the
        federation has finished, its `head-refit`."""
        path = self.dir / "best.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def best_val_mse(self) -> float:
        best = self.best()
        return best["val-mse"] if best else float("inf")

    def write_report(self, extra: dict[str, Any], *, plot: bool = True) -> dict[str, Any]:
        """report.json from every round record, plus learning curves of validation MSE (not
        drawn with `plot=False`: a running federation redraws them every 10th round)."""
        from remdr.plots import learning_curves

        rounds = self.records()
        sites: dict[str, list[dict]] = {}
        for rec in rounds:
            for site, metrics in rec.get("sites", {}).items():
                sites.setdefault(site, []).append({"round": rec["round"], **metrics})
        best = self.best()
        report = {
            "remdr_version": __version__,
            "rounds": rounds,
            "sites": sites,
            "best": best,
            "site_test": site_test_metrics(rounds, best["round"] if best else None),
            **extra,
        }
        _atomic_write(
            self.dir / "report.json", json.dumps(clean(report), indent=2, default=_jsonable)
        )
        if not plot:
            return report
        series = {
            "global (weighted)": [
                (r["round"], r.get("evaluate", {}).get("val-mse")) for r in rounds
            ]
        }
        for site, rows in sites.items():
            series[site] = [
                (row["round"], row.get("eval-val-mse", row.get("val-mse"))) for row in rows
            ]
        series = {
            k: [(x, y) for x, y in v if y is not None and math.isfinite(y)]
            for k, v in series.items()
        }
        learning_curves(
            series, self.dir / "learning_curves.png", "validation MSE (dB²)", "federated training"
        )
        return report


def choose_blend(aggregate: dict[str, Any]) -> Blend | None:
    """The blend the sites' aggregated validation probes (`val-mse-blend-*`) choose; None
    without probes (a model without a fusion head, `head-blend=false`) or when the fusion head
    alone is best. The mean of the sites' MSEs weighted by their validation eyes is the pooled
    validation MSE, so the weight is the one pooling the validation eyes would choose."""
    metrics = {
        k.replace("-", "_"): float(v) for k, v in aggregate.items() if k.startswith("val-mse")
    }
    blend = choose(metrics, MODALITIES, key="val_mse")
    return blend if blend.weight > 0 else None


def site_test_metrics(rounds: list[dict[str, Any]], best_round: int | None) -> dict | None:
    """Each site's metrics on its own held-out test split (the `test/` folder it ships) for the
    final and the best global model. Reported only: no choice (best round, early stop) reads them."""

    def at(rec: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        out = {}
        for site, m in (rec or {}).get("sites", {}).items():
            test = {
                k[len("eval-") :]: v
                for k, v in m.items()
                if k.startswith(("eval-test-", "eval-num-test"))
            }
            if test:
                out[site] = {"round": rec["round"], **test}
        return out

    by_round = {rec["round"]: rec for rec in rounds}
    final = at(rounds[-1] if rounds else None)
    if not final and not any(at(rec) for rec in rounds):
        return None
    return {
        "what": "each site's own test split (never used to choose a model)",
        "final": final,
        "best": at(by_round.get(best_round)) if best_round is not None else {},
    }


def privacy_summary(rounds: list[dict[str, Any]], site_level: dict | None = None) -> dict:
    """Which guarantee the run has, per granularity; never one confused with the other.

    Sample-level: each site's cumulative (epsilon, delta) for one patient, as its ledger says
    (the latest round it reported), plus the rounds it declined for budget.
    """
    sites: dict[str, dict[str, Any]] = {}
    for rec in rounds:
        for site, m in rec.get("sites", {}).items():
            if "dp-epsilon" in m:
                sites.setdefault(site, {}).update(
                    {
                        "epsilon": m["dp-epsilon"],
                        "delta": m.get("dp-delta"),
                        "noise_multiplier": m.get("dp-noise"),
                        "clip": m.get("dp-clip"),
                        "sample_rate": m.get("dp-sample-rate"),
                        "last_round": rec["round"],
                    }
                )
        for err in rec.get("errors", []):
            if "privacy budget" in err.get("reason", ""):
                sites.setdefault(err["site"], {}).setdefault("declined_rounds", []).append(
                    rec["round"]
                )
    sample = (
        {"granularity": "sample-level: add or remove one patient at a site", "sites": sites}
        if sites
        else None
    )
    guarantees = [g for g, v in (("sample-level", sample), ("site-level", site_level)) if v]
    return {
        "guarantee": ", ".join(guarantees) if guarantees else "none",
        "sample_level": sample,
        "site_level": site_level,
        "not_covered": 'metrics and dataset sizes reported by sites; see docs/privacy.md, "Not covered"',
    }


def _jsonable(x: Any) -> Any:
    return x.item() if hasattr(x, "item") else str(x)


def clean(obj: Any) -> Any:
    """JSON-safe copy: NaN and inf become null (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj
