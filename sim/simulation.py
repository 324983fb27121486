"""One simulated multi-site study, callable from any program: partition a dataset into sites,
federate them with Flower's simulation runtime, and score the federated model (and the
comparison arms) on a global test set no site ever sees. `remdr-sim` is a thin CLI over it.

    sim = Simulation(cfg, out=Path("runs/sim"), partition=PartitionSpec(sites=4, alpha=1.0))
    report = run_simulation(sim)          # also written to runs/sim/report.json
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remdr.sim.arms import (
    federated_test_curve,
    final_model,
    one_image_tests,
    test_metrics,
    tested,
    train_central,
)
from remdr.sim.partition import PartitionSpec
from remdr.sim.report import local_work
from remdr.sim.runner import SimResources

from remdr.config import ExperimentConfig, flat_values
from remdr.data import SyntheticSpec
from remdr.errors import RemdrError


@dataclass
class Simulation:
    """What to simulate. `cfg` is the sites' training config (the federated defaults applied);
    both comparison arms train the same config for rounds x local epochs."""

    cfg: ExperimentConfig
    out: Path  # the run directory; replaced once the data is known to load
    partition: PartitionSpec = field(default_factory=PartitionSpec)
    data: str = ""  # a dataset folder; empty: the embedded synthetic set of `synthetic_n` eyes
    synthetic_n: int = SyntheticSpec.n
    rounds: int = 8
    local_epochs: int = 1
    strategy: str = "fedavg"
    fedbn: bool = False
    fed: dict[str, Any] = field(default_factory=dict)  # any other federation key (run config)
    resources: SimResources = field(default_factory=SimResources)
    compare_centralized: bool = False
    compare_local: bool = False
    compare_complete_only: bool = False  # also federate the sites listed as "both" alone
    reference: str = ""  # a method federated too on the same partition (e.g. concat, the naive one)
    batch_from_patients: Callable[[list[int]], int] | None = None  # the DP recipe's batch size
    progress: bool = True
    # a folder of centralized arms trained before (`remdr-sim suite` keeps one): the arm depends
    # on the training config, the partition and its epochs only, not on the federation
    central_cache: Path | None = None
    central_epochs: int = 0  # > 0: the centralized arm trains this many epochs, not the fed's work


def run_simulation(sim: Simulation, say: Callable[[str], None] = print) -> dict:
    """Run `sim`; return its report (also `report.json` and `report.md` in `sim.out`)."""
    from remdr.sim.partition import partition
    from remdr.sim.report import write_sim_report
    from remdr.sim.runner import finish_teardowns

    from remdr.data import load_dataset, synthetic_data
    from remdr.data.dataset import EyeDataset
    from remdr.data.splits import site_split_key
    from remdr.federation.run_config import split_run_config
    from remdr.federation.run_directory import clean
    from remdr.federation.site_round import load_site

    t0 = time.perf_counter()
    cfg = sim.cfg
    data_path = sim.data or str(synthetic_data(SyntheticSpec(n=sim.synthetic_n)))
    dataset = load_dataset(data_path, cfg.data, quiet=True)
    say(f"data: {data_path}: {dataset.report.summary()}")
    out = Path(sim.out).resolve()  # replaced only once the data is known to load
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    spec = sim.partition
    part = partition(dataset, spec, out / "data")
    say(
        f"partition ({spec.scheme}, alpha={spec.alpha}, seed {spec.seed}); eyes per severity "
        f"bin:\n{part.table()}"
    )
    if sim.batch_from_patients is not None:
        patients = [len({r.patient_id for r in recs}) for recs in part.sites.values()]
        batch = sim.batch_from_patients(patients)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
        say(f"DP recipe: batch-size {batch} (site patients {sorted(patients)})")

    run_config = {
        **flat_values(cfg),
        "num-server-rounds": sim.rounds,
        "local-epochs": sim.local_epochs,
        "strategy": sim.strategy,
        "fedbn": sim.fedbn,
        "min-nodes": len(part.sites),
        "out-dir": str(out / "federation"),
        "sim-data-root": str(out / "data" / "sites"),
        **sim.fed,
    }
    _, fed = split_run_config(run_config)  # fail early on a bad combination
    say(
        f"federated: {len(part.sites)} sites x {sim.rounds} rounds x {local_work({**run_config, 'local-steps': fed.local_steps})}, "
        f"{cfg.train.method}, {run_config['strategy']}"
    )
    test_ds = EyeDataset(part.test, cfg.data)
    t_fed = time.perf_counter()
    fed_run, ports = _federate(run_config, len(part.sites), sim, out / "federation", "flower.log")
    fed_seconds = time.perf_counter() - t_fed
    model = final_model(cfg, out / "federation", sim.rounds)
    fed_metrics, fed_preds = test_metrics(model, test_ds, cfg)
    results: dict[str, Any] = {
        "federated": {
            "test": fed_metrics,
            "test_pred": fed_preds["pred"].tolist(),
            "test_md": fed_preds["md"].tolist(),
            **one_image_tests(model, part.test, cfg),
            "wall_seconds": fed_seconds,
            "head_blend": (fed_run.best() or {}).get("head-blend"),
            "head_refit": (fed_run.best() or {}).get("head-refit"),
            "test_curve": federated_test_curve(fed_run, model, test_ds, cfg, fed_seconds),
        }
    }
    if sim.compare_complete_only:
        results["complete_sites_only"] = _complete_sites_only(
            sim, cfg, part, run_config, test_ds, say
        )
    if sim.reference:
        results["reference"] = _reference(sim, cfg, run_config, test_ds, say)

    epochs = sim.central_epochs or central_epochs(fed, part, cfg)
    cached = _cached_central(sim, cfg, epochs) if sim.compare_centralized else None
    need_sites = sim.compare_local or (sim.compare_centralized and cached is None)
    sites = (
        {
            name: load_site(
                part.site_dir(name), cfg, seed=cfg.train.seed, split_key=site_split_key(name)
            )
            for name in part.sites
        }
        if need_sites
        else {}
    )
    if cached is not None:
        results["centralized"] = cached
    elif sim.compare_centralized:
        union_train = EyeDataset([r for s in sites.values() for r in s.train.records], cfg.data)
        union_val = EyeDataset([r for s in sites.values() for r in s.val.records], cfg.data)
        results["centralized"] = {
            **train_central(
                cfg, dataset, union_train, union_val, test_ds,
                epochs=epochs, desc="centralized", progress=sim.progress,
            ),
            "epochs": epochs,
        }  # fmt: skip
        _cache_central(sim, cfg, epochs, results["centralized"])
    if sim.compare_local:
        results["local"] = {
            name: train_central(
                cfg, dataset, site.train, site.val, test_ds,
                epochs=epochs, desc=f"local {name}", progress=sim.progress,
            )
            for name, site in sites.items()
        }  # fmt: skip

    finish_teardowns()  # the federations' processes, stopped while the arms were tested
    report = {
        "config": cfg.to_dict(),
        "run_config": {**run_config, "local-steps": fed.local_steps},  # auto resolved
        "partition": part.summary(),
        "federation": json.loads((out / "federation" / "report.json").read_text()),
        "results": results,
        "test_md": fed_preds["md"].tolist(),  # each arm's `test_pred` is in this order
        "wall_seconds": time.perf_counter() - t0,
        "local_superlink_ports": list(ports),
    }
    (out / "report.json").write_text(json.dumps(clean(report), indent=2, default=str))
    report["report_md"] = str(write_sim_report(out, report, fed_preds))
    return report


def central_epochs(fed, part, cfg: ExperimentConfig) -> int:
    """The centralized arm's epochs: the federation's passes over the data. With local epochs
    that is rounds x local epochs; with `local-steps` K, the sites together train
    rounds x K x sites batches, which is that many batches of the pooled training eyes."""
    if fed.local_steps <= 0:
        return fed.num_server_rounds * fed.local_epochs
    from remdr.data.splits import site_split_key, split_by_key

    train = sum(  # a simulated site draws its validation patients by its key (as it does)
        len(split_by_key(recs, cfg.data.val_fraction, site_split_key(name))["train"])
        for name, recs in part.sites.items()
    )
    batches = fed.num_server_rounds * fed.local_steps * len(part.sites)
    return max(1, round(batches * cfg.train.batch_size / max(1, train)))


def _central_path(sim: Simulation, cfg: ExperimentConfig, epochs: int) -> Path | None:
    if sim.central_cache is None:
        return None
    what = {
        "cfg": cfg.to_dict(),
        "partition": dataclasses.asdict(sim.partition),
        "data": sim.data,
        "synthetic_n": sim.synthetic_n,
        "epochs": epochs,
    }
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()
    return Path(sim.central_cache) / f"{key[:16]}.json"


def _cached_central(sim: Simulation, cfg: ExperimentConfig, epochs: int) -> dict | None:
    path = _central_path(sim, cfg, epochs)
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _cache_central(sim: Simulation, cfg: ExperimentConfig, epochs: int, result: dict) -> None:
    path = _central_path(sim, cfg, epochs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, default=str))


def _federate(run_config: dict, n_sites: int, sim: Simulation, run_dir: Path, log_name: str):
    """One federation on Flower's simulation runtime into `run_dir` (the run config's out-dir);
    (its RunDirectory, the local SuperLink's ports). Raises a one-line error when it did not
    finish every round."""
    from remdr.sim.runner import check_finished, check_trained, run_federation, stream_printer

    from remdr.federation.run_directory import RunDirectory
    from remdr.ops.processes import free_port

    log_path = run_dir.parent / log_name
    ports = (free_port(), free_port())  # the local SuperLink's HTTP and Control API ports
    code = run_federation(run_config, n_sites, sim.resources, log_path, stream_printer(), ports)
    check_finished(code, log_path)
    run = RunDirectory(run_dir)
    if run.last_round() < sim.rounds:
        raise RemdrError(
            f"the federation stopped after {run.last_round()} round(s)",
            "sites failed or did not answer (see the errors in the round records)",
            f"see {log_path}",
        )
    check_trained(run.records(), log_path)
    return run, ports


def _reference(sim: Simulation, cfg: ExperimentConfig, run_config: dict, test_ds, say) -> dict:
    """The same federation training `sim.reference` instead: what the method adds over it."""
    out = Path(sim.out).resolve()
    say(f"\nfederated {sim.reference} (the reference), same partition and settings")
    t_ref = time.perf_counter()
    ref_config = {**run_config, "method": sim.reference, "out-dir": str(out / "federation-ref")}
    ref_run, _ = _federate(
        ref_config, run_config["min-nodes"], sim, out / "federation-ref", "flower-ref.log"
    )
    ref_cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, method=sim.reference))
    model = final_model(ref_cfg, out / "federation-ref", sim.rounds)
    best = ref_run.best() or {}
    return {
        "method": sim.reference,
        "val_mse": float(best.get("val-mse", float("nan"))),
        "head_blend": best.get("head-blend"),
        "head_refit": best.get("head-refit"),
        **tested(model, test_ds, ref_cfg),
        "wall_seconds": time.perf_counter() - t_ref,
    }


def _complete_sites_only(
    sim: Simulation, cfg: ExperimentConfig, part, run_config: dict, test_ds, say
) -> dict:
    """The federation of only the sites listed as "both": what the incomplete sites add."""
    out = Path(sim.out).resolve()
    kinds = sim.partition.site_modalities
    complete = [n for n, k in zip(part.sites, kinds, strict=True) if k == "both"]
    root = out / "data" / "complete-sites"  # virtual node k reads <root>/site-<k>
    for k, name in enumerate(complete):
        (root / f"site-{k}").parent.mkdir(parents=True, exist_ok=True)
        (root / f"site-{k}").symlink_to(part.site_dir(name), target_is_directory=True)
    say(f"\nfederated, complete sites only: {', '.join(complete)}")
    t_complete = time.perf_counter()
    complete_config = {
        **run_config,
        "min-nodes": len(complete),
        "out-dir": str(out / "federation-complete"),
        "sim-data-root": str(root),
    }
    complete_run, _ = _federate(
        complete_config, len(complete), sim, out / "federation-complete", "flower-complete.log"
    )
    model = final_model(cfg, out / "federation-complete", sim.rounds)
    return {
        "sites": complete,
        **tested(model, test_ds, cfg),
        "head_blend": (complete_run.best() or {}).get("head-blend"),
        "head_refit": (complete_run.best() or {}).get("head-refit"),
        "wall_seconds": time.perf_counter() - t_complete,
    }
