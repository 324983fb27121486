"""The Flower ServerApp: initial model, checkpoint every round, resume after a restart.

All ML lives in `remdr`; the strategy (`remdr.server.strategy`) maps the run config onto a Flower
strategy, and this module runs it over a `RetryingGrid`, recording what each round did in the
coordinator's run directory (`out-dir`).
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from remdr.server.grid import RetryingGrid
from remdr.server.strategy import RoundAborted, build_strategy, site_level_privacy

from remdr import __version__
from remdr.federation.run_config import split_run_config
from remdr.federation.run_directory import RunDirectory, privacy_summary
from remdr.methods import build_model, create_method
from remdr.runtime import seed_everything

log = logging.getLogger("flwr")  # Flower's handlers stream this to `remdr-server run`
app = ServerApp()


def initial_state(context: Context):
    cfg, _ = split_run_config(dict(context.run_config))
    seed_everything(cfg.train.seed, torch.device("cpu"))
    method = create_method(cfg.train.method, cfg.method)
    model = build_model(cfg, method)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg, fed = split_run_config(dict(context.run_config))
    run = RunDirectory(fed.out_dir)
    done = run.last_round()
    if done:
        state = run.load_weights(done)
        log.info("resuming from %s after round %d of %d", run.dir, done, fed.num_server_rounds)
    else:
        state = initial_state(context)
    strategy = build_strategy(fed)
    strategy.round_offset = done
    strategy.grid = RetryingGrid(grid)
    start = time.time()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        record = dict(strategy.current)
        record["seconds"] = time.time() - record.pop("started", start)
        record["config"] = dict(context.run_config)
        if fed.site_dp != "off":
            releases = sum(1 for r in run.records() if r.get("aggregated"))
            record["site_dp"] = site_level_privacy(fed, releases + bool(record.get("aggregated")))
        run.save_round(server_round + done, arrays.to_torch_state_dict(), record)
        per_site = ", ".join(
            f"{site} {m['eval-val-mse']:.2f}"
            for site, m in sorted(record.get("sites", {}).items())
            if "eval-val-mse" in m
        )
        val = record.get("evaluate", {}).get("val-mse", float("nan"))
        missing = record.get("missing")
        log.info(
            "remdr round %d/%d: val MSE %.2f (%s) in %.1fs%s",
            server_round + done, fed.num_server_rounds, val, per_site, record["seconds"],
            f"; missing {missing}" if missing else "",
        )  # fmt: skip
        run.write_report({"status": "running", "config": dict(context.run_config)})
        return None

    remaining = fed.num_server_rounds - done
    status, reason = "completed", ""
    try:
        if remaining > 0:
            strategy.start(
                grid=strategy.grid,
                initial_arrays=ArrayRecord(state),
                num_rounds=remaining,
                timeout=fed.round_timeout,
                train_config=ConfigRecord({"remdr-version": __version__}),
                evaluate_config=ConfigRecord({"remdr-version": __version__}),
                evaluate_fn=checkpoint,
            )
    except RoundAborted as err:
        status, reason = "aborted", str(err)
        log.error("federation aborted: %s", err)
    records = run.records()
    site_dp = site_level_privacy(fed, sum(1 for r in records if r.get("aggregated")))
    report = run.write_report(
        {
            "status": status,
            **({"reason": reason} if reason else {}),
            "config": dict(context.run_config),
            "wall_seconds_last_start": time.time() - start,
            "privacy": privacy_summary(records, site_dp),
        }
    )
    log.info(
        "federation finished: %d rounds in %s (best %s)",
        len(report["rounds"]),
        run.dir,
        report["best"],
    )
